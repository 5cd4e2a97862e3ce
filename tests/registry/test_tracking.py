"""A real distillation, read back through MlflowClient and the Model Registry."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kd_ops.evaluation.metrics import COMMON_METRICS, STUDENT_METRICS
from kd_ops.registry.tracking import TAG_CODE_VERSION, TAG_CONFIG_HASH, TAG_DATASET, TAG_ROLE, TAG_TEACHER_URI

from ..conftest import tiny_raw

ROLES = ("teacher", "baseline", "student")


def test_parent_with_three_nested_children(distilled, tracking_uri):
    _, result = distilled
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.runs["parent"])
    assert parent.data.tags[TAG_ROLE] == "parent"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == sorted(ROLES)
    for child in children:
        assert child.info.run_id == result.runs[child.info.run_name]
        assert child.data.tags[TAG_ROLE] == child.info.run_name
        assert child.info.status == "FINISHED"


def test_children_log_identical_metric_names_on_the_test_split(distilled, tracking_uri):
    _, result = distilled
    client = MlflowClient(tracking_uri)
    keys = {role: set(client.get_run(result.runs[role]).data.metrics) for role in ROLES}
    eval_keys = {role: {k for k in ks if k.startswith("test_") or k in COMMON_METRICS} for role, ks in keys.items()}
    assert eval_keys["teacher"] == eval_keys["baseline"] == eval_keys["student"]
    assert set(COMMON_METRICS) <= eval_keys["teacher"]
    slices = {k for k in eval_keys["teacher"] if k.startswith("test_accuracy_slice_")}
    assert {f"test_accuracy_slice_label_{c}" for c in range(10)} <= slices
    assert {f"test_accuracy_slice_ink_{v}" for v in ("low", "mid", "high")} <= slices
    for role in ("baseline", "student"):
        assert set(STUDENT_METRICS) <= keys[role]
    assert not set(STUDENT_METRICS) & keys["teacher"]
    # Lightning's MLFlowLogger wrote training curves into the child runs
    history = client.get_metric_history(result.runs["student"], "val_accuracy")
    assert len(history) == 4  # one point per epoch of the tiny config


def test_metric_values_are_consistent(distilled):
    _, result = distilled
    t, s = result.metrics["teacher"], result.metrics["student"]
    assert 0 < s["test_accuracy"] <= 1
    assert s["accuracy_retention"] == pytest.approx(s["test_accuracy"] / t["test_accuracy"])
    assert s["compression_ratio"] == pytest.approx(t["param_count"] / s["param_count"])
    assert s["param_count"] < t["param_count"]
    assert s["latency_ms_p50"] <= s["latency_ms_p95"]


def test_challenger_loads_and_predicts_exactly_the_in_memory_student(distilled, tracking_uri):
    cfg, result = distilled
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{cfg.registry.name}@challenger")
    x, _ = result.datamodule.arrays("test")
    with torch.inference_mode():
        expected = result.models["student"](torch.as_tensor(x))
        got = loaded(torch.as_tensor(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registry.name}@challenger")
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x[:7])), expected[:7].numpy(), rtol=1e-5, atol=1e-6)


def test_registered_version_carries_lineage_signature_and_alias(distilled, tracking_uri):
    cfg, result = distilled
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(cfg.registry.name, "challenger")
    assert str(version.version) == result.registered["version"]
    tags = version.tags
    teacher_uri = client.get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]
    assert tags[TAG_TEACHER_URI] == teacher_uri and teacher_uri.startswith("models:/")
    assert tags[TAG_DATASET] == result.datamodule.fingerprint()
    assert tags[TAG_CONFIG_HASH] == cfg.hash()
    assert tags[TAG_CODE_VERSION].startswith("0.")
    info = mlflow.models.get_model_info(f"models:/{cfg.registry.name}@challenger")
    assert info.signature is not None
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 64]
    assert "distilled" in (version.description or "")


def test_saved_model_holds_nothing_of_the_wrapper(distilled, tracking_uri):
    cfg, result = distilled
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{cfg.registry.name}@challenger")
    n_params = sum(p.numel() for p in loaded.parameters())
    assert n_params == result.metrics["student"]["param_count"]
    assert not any("teacher" in name for name, _ in loaded.named_parameters())


@pytest.mark.slow
def test_cli_json_and_teacher_uri_reuse(distilled, tracking_uri, tmp_path):
    """`--json` prints exactly one JSON object; a teacher given by URI is loaded, not retrained."""
    _, first = distilled
    teacher_uri = MlflowClient(tracking_uri).get_run(first.runs["teacher"]).data.tags[TAG_TEACHER_URI]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tracking_uri)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_ops.cli",
            "distill",
            str(path),
            "--json",
            "--set",
            f"teacher.uri={teacher_uri}",
            "--set",
            "distill.temperature=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert set(out) == {"teacher", "baseline", "student", "runs", "registered", "gates"}
    assert set(out["runs"]) == {"parent", "teacher", "baseline", "student"}
    assert out["registered"]["name"] == "test-student" and out["registered"]["alias"] == "challenger"
    assert int(out["registered"]["version"]) == int(first.registered["version"]) + 1
    for role in ("teacher", "baseline", "student"):
        assert set(COMMON_METRICS) <= set(out[role])
    assert set(STUDENT_METRICS) <= set(out["student"])
    # the loaded teacher scores what it scored when it was trained
    assert out["teacher"]["test_accuracy"] == pytest.approx(first.metrics["teacher"]["test_accuracy"])
    teacher_run = MlflowClient(tracking_uri).get_run(out["runs"]["teacher"])
    assert teacher_run.data.params["uri"] == teacher_uri
    assert "train_time_s" not in teacher_run.data.metrics


def test_teacher_uri_that_does_not_resolve(tmp_path, tracking_uri, capsys):
    from kd_ops.cli.main import main

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tracking_uri)))
    assert main(["distill", str(path), "--set", "teacher.uri=models:/no-such-model/7"]) == 2
    err = capsys.readouterr().err
    assert "teacher.uri = 'models:/no-such-model/7'" in err and "Traceback" not in err
