"""Models registered before the move into packages keep loading: a scikit-learn student stored
in skops format by kd-ops 0.1 names its class by the old dotted path
(`kd_ops.sklearn_student.SoftTargetClassifier`), which `kd_ops/sklearn_student.py` keeps alive.

The fixture (`tests/fixtures/sklearn_student_kd_ops_0_1/`) was saved by kd-ops 0.1 itself, before
the move, with five rows and the probabilities it gave for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np

import kd_ops

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_student_registered_before_the_move_loads_and_answers_the_same(tmp_path):
    saved = json.loads((FIXTURES / "sklearn_student_kd_ops_0_1.json").read_text())
    assert saved["saved_by"].startswith("0.1.0")
    model_dir = FIXTURES / "sklearn_student_kd_ops_0_1"
    assert "kd_ops.sklearn_student.SoftTargetClassifier" in (model_dir / "MLmodel").read_text()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("compat", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(model_dir), "model")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "old-student").version
    model = kd_ops.load_model(f"models:/old-student/{version}")
    assert type(model).__name__ == "SoftTargetClassifier"
    probs = model.predict_proba(np.asarray(saved["rows"], dtype=np.float32))
    np.testing.assert_allclose(probs, saved["probabilities"], rtol=1e-6)
    assert probs.shape == (5, 10)  # class 9 was absent from its training rows: the wrapper still answers it


def test_the_old_path_is_the_new_class():
    from kd_ops.models.sklearn_students import SoftTargetClassifier
    from kd_ops.sklearn_student import SoftTargetClassifier as Old

    assert Old is SoftTargetClassifier


def test_entry_points_and_module_commands_follow_the_move():
    from importlib.metadata import entry_points

    groups = {
        "console_scripts": ("kd-ops", "kd_ops.cli", "main"),
        "mlflow.model_evaluator": ("distillation", "kd_ops.evaluation.mlflow_evaluator", "DistillationEvaluator"),
        "mlflow.run_context_provider": ("kd_ops", "kd_ops.registry.lineage", "LineageRunContext"),
    }
    for group, (name, module, attr) in groups.items():
        (ep,) = [e for e in entry_points(group=group) if e.name == name]
        assert (ep.module, ep.attr) == (module, attr)
        assert ep.load() is not None  # imports: the path exists
    for module in ("kd_ops", "kd_ops.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"kd-ops {kd_ops.__version__}", out.stderr
