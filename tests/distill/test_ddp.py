"""Distillation with Lightning's DDP over 2 CPU processes (gloo, `ddp_spawn`), end to end: it
completes, MLflow gets one set of runs and one version, the accuracy matches one process, and
the teacher-output cache is computed by both processes and written once."""

from __future__ import annotations

import mlflow
import pytest

from kd_ops.config.loading import config_from_dict
from kd_ops.pipeline.distillation import run_distillation

from ..conftest import tiny_raw

pytestmark = pytest.mark.slow


def _distil(tmp_path, name: str, **train):
    uri = f"sqlite:///{tmp_path}/{name}.db"
    raw = tiny_raw(
        uri,
        registry={"name": name},
        train={"progress_bar": False, **train},
        teacher={"epochs": 6, "augment": ["noise"]},  # the augmentation must survive the spawn
        student={"epochs": 12},
        distill={"baseline": False, "cache": {"dir": str(tmp_path / name / "cache")}},
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
    student_tags = client.get_run(ddp.runs["student"]).data.tags
    assert student_tags["kd_ops.teacher_cache"] == "miss" and student_tags["kd_ops.teacher_cache_processes"] == "2"
    assert len(list((tmp_path / "ddp" / "cache").glob("*.pt"))) == 1  # written once, by the main process
    # Same effective batch, same number of steps: the same accuracy, within the noise of a tiny run.
    for role in ("teacher", "student"):
        assert abs(ddp.metrics[role]["test_accuracy"] - single.metrics[role]["test_accuracy"]) < 0.08, role


def test_distributed_teacher_outputs_equal_one_process_row_for_row():
    import torch

    from kd_ops.config.training import DataConfig, TeacherConfig, TrainConfig
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.distill.cache import compute_teacher_outputs
    from kd_ops.distill.distributed import distributed_teacher_outputs
    from kd_ops.distill.taps import tapped
    from kd_ops.pipeline.distillation import _new_model

    dm = DistillDataModule(DataConfig(name="digits"), 0)
    dm.setup()
    teacher = _new_model(TeacherConfig(model="cnn", params={"channels": [8, 16], "hidden": 32}), dm, 0).eval()
    x = torch.as_tensor(dm.raw.x[dm.splits.transfer][:301])  # 301 rows in batches of 40: padded shards
    path = "net.features.1"
    with tapped(teacher, [path], "teacher") as tap:
        one = compute_teacher_outputs(teacher, x, features=lambda _: dict(tap.features))
    two = distributed_teacher_outputs(
        teacher, x, TrainConfig(accelerator="cpu", devices=2, strategy="ddp_spawn"), [path], batch_size=40
    )
    assert set(two) == set(one) == {"logits", f"feat:{path}"}
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
