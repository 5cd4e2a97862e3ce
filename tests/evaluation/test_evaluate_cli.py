"""`kd-ops evaluate` and `evaluate_model` on a registered model, and every bad input they meet."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kd_ops.cli.main import main
from kd_ops.config.loading import config_from_dict
from kd_ops.core.errors import ConfigError
from kd_ops.evaluation.evaluate import evaluate_model
from kd_ops.evaluation.metrics import COMMON_METRICS, STUDENT_METRICS

from ..conftest import tiny_raw


@pytest.fixture
def config_file(tmp_path, tracking_uri):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tracking_uri)))
    return path


def _uris(distilled, tracking_uri):
    cfg, result = distilled
    teacher = MlflowClient(tracking_uri).get_run(result.runs["teacher"]).data.tags["kd_ops.teacher_model_uri"]
    return f"models:/{cfg.registry.name}/{result.registered['version']}", teacher


def test_evaluate_model_matches_the_distillation_and_adds_the_edge(distilled, tracking_uri):
    cfg, result = distilled
    student_uri, teacher_uri = _uris(distilled, tracking_uri)
    out = evaluate_model(student_uri, cfg, teacher_uri=teacher_uri, edge=("onnx", "onnx_int8"))
    assert list(out.metrics) == ["model", "teacher", "onnx", "onnx_int8"]
    for name, metrics in out.metrics.items():
        assert set(COMMON_METRICS) <= set(metrics), name
    for name in ("model", "onnx", "onnx_int8"):
        assert set(STUDENT_METRICS) <= set(out.metrics[name])
    # the registered model scores on the test split what the distillation logged for it
    for key in ("test_accuracy", "test_nll", "robust_accuracy_noise", "test_accuracy_slice_ink_low"):
        assert out.metrics["model"][key] == pytest.approx(result.metrics["student"][key], abs=1e-6)
    assert out.metrics["teacher"]["test_accuracy"] == pytest.approx(result.metrics["teacher"]["test_accuracy"])
    assert out.metrics["onnx"]["agreement_with_teacher"] == pytest.approx(
        out.metrics["model"]["agreement_with_teacher"]
    )
    assert len(out.confusion["model"]) == 10


def test_evaluate_on_another_split_and_logged(distilled, tracking_uri):
    cfg, _ = distilled
    student_uri, teacher_uri = _uris(distilled, tracking_uri)
    out = evaluate_model(student_uri, cfg, split="val", teacher_uri=teacher_uri, log=True)
    assert "val_accuracy" in out.metrics["model"] and "test_accuracy" not in out.metrics["model"]
    run = MlflowClient(tracking_uri).get_run(out.run_id)
    assert run.data.metrics["val_accuracy"] == pytest.approx(out.metrics["model"]["val_accuracy"])
    assert run.data.params["split"] == "val" and run.data.tags["kd_ops.role"] == "evaluation"
    # MLflow's own classifier evaluation ran on the predictions; teacher-relative figures are kd-ops'
    assert run.data.metrics["accuracy_score"] == pytest.approx(out.metrics["model"]["val_accuracy"])
    assert run.data.metrics["agreement_with_teacher"] == pytest.approx(out.metrics["model"]["agreement_with_teacher"])
    assert run.data.metrics["teacher.val_accuracy"] == pytest.approx(out.metrics["teacher"]["val_accuracy"])
    # lineage tags from the run-context plugin
    assert run.data.tags["kd_ops.evaluated_model_uri"] == student_uri


@pytest.mark.slow
def test_cli_json(distilled, tracking_uri, config_file):
    student_uri, _ = _uris(distilled, tracking_uri)
    proc = subprocess.run(
        [sys.executable, "-m", "kd_ops.cli", "evaluate", student_uri, "--config", str(config_file), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["uri"] == student_uri and out["split"] == "test"
    assert set(COMMON_METRICS) <= set(out["model"])
    assert "profiler_start" not in proc.stderr  # the peak-memory profiler keeps quiet


def test_cli_table(distilled, tracking_uri, config_file, capsys):
    student_uri, teacher_uri = _uris(distilled, tracking_uri)
    assert main(["evaluate", student_uri, "--config", str(config_file), "--teacher", teacher_uri]) == 0
    out = capsys.readouterr().out
    assert "latency_ms_p99" in out and "robust_accuracy_shift" in out and "agreement_with_teacher" in out


def test_model_uri_that_does_not_resolve(config_file, capsys):
    assert main(["evaluate", "models:/no-such-model@champion", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "model URI = 'models:/no-such-model@champion': cannot load it" in err and "Traceback" not in err


def test_data_that_does_not_fit_the_model(distilled, tracking_uri, config_file, capsys):
    student_uri, _ = _uris(distilled, tracking_uri)
    args = ["evaluate", student_uri, "--config", str(config_file), "--set", "data.name=mnist5k"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not accept rows of 784 features from data.name = 'mnist5k'" in err and "Traceback" not in err


def test_gate_naming_an_unknown_metric(tracking_uri, config_file, capsys):
    with pytest.raises(ConfigError, match=r"gates.max_latency_p95 = 2.0: unknown metric 'latency_p95'; known: "):
        config_from_dict(tiny_raw(tracking_uri, gates={"max_latency_p95": 2.0}), "x")
    with pytest.raises(ConfigError, match="a gate is min_<metric> or max_<metric>"):
        config_from_dict(tiny_raw(tracking_uri, gates={"latency_ms_p95": 2.0}), "x")
    with pytest.raises(ConfigError, match="slice_drop_vs_champion takes only max_"):
        config_from_dict(tiny_raw(tracking_uri, gates={"min_slice_drop_vs_champion": 0.1}), "x")
    assert main(["distill", str(config_file), "--set", "gates.min_accuracy_retension=0.9"]) == 2
    assert "unknown metric 'accuracy_retension'" in capsys.readouterr().err


def test_reserved_aliases_cannot_be_the_registration_alias(tracking_uri):
    for alias in ("champion", "previous"):
        with pytest.raises(ConfigError, match=f"registry.alias = '{alias}': 'champion' and 'previous' are set only"):
            config_from_dict(tiny_raw(tracking_uri, registry={"alias": alias}), "x")


def test_bad_split(distilled, tracking_uri):
    cfg, _ = distilled
    student_uri, _ = _uris(distilled, tracking_uri)
    with pytest.raises(ConfigError, match="split = 'holdout': expected one of train, transfer, val, test"):
        evaluate_model(student_uri, cfg, split="holdout")
