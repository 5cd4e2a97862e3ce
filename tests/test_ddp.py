"""Distillation with Lightning's DDP over 2 CPU processes (gloo, `ddp_spawn`), end to end: it
completes, MLflow gets one set of runs and one version, and the accuracy matches one process."""

from __future__ import annotations

import mlflow
import pytest

from kd_ops.config import config_from_dict
from kd_ops.pipeline import run_distillation

from .conftest import tiny_raw

pytestmark = pytest.mark.slow


def _distil(tmp_path, name: str, **train):
    uri = f"sqlite:///{tmp_path}/{name}.db"
    raw = tiny_raw(
        uri,
        registry={"name": name},
        train={"progress_bar": False, **train},
        teacher={"epochs": 6, "augment": ["noise"]},  # the augmentation must survive the spawn
        student={"epochs": 12},
        distill={"baseline": False},
    )
    return uri, run_distillation(config_from_dict(raw, name))


def test_ddp_over_two_processes_matches_one_process(tmp_path):
    _, single = _distil(tmp_path, "single")
    uri, ddp = _distil(tmp_path, "ddp", accelerator="cpu", devices=2, strategy="ddp_spawn")

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([ddp.experiment_id])
    assert sorted(r.data.tags["kd_ops.role"] for r in runs) == ["parent", "student", "teacher"]  # rank 0 only
    assert [str(v.version) for v in client.search_model_versions("name = 'ddp'")] == ["1"]
    epochs = client.get_metric_history(ddp.runs["student"], "train_loss")
    assert len(epochs) == 12  # one point per epoch: the other rank logged nothing
    assert client.get_run(ddp.runs["parent"]).data.params["train.strategy"] == "ddp_spawn"
    # Same effective batch, same number of steps: the same accuracy, within the noise of a tiny run.
    for role in ("teacher", "student"):
        assert abs(ddp.metrics[role]["test_accuracy"] - single.metrics[role]["test_accuracy"]) < 0.08, role
