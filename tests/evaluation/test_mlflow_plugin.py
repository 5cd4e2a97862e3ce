"""kd-ops as an MLflow plugin, judged by its effect on real runs: MLflow finds the evaluator and
the run-context provider through their entry points (a plugin that fails to load only warns)."""

from __future__ import annotations

from importlib.metadata import entry_points

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from kd_ops.registry.lineage import TAG_PLUGIN, lineage


def test_entry_points_are_installed():
    evaluators = {e.name: e.value for e in entry_points(group="mlflow.model_evaluator")}
    providers = {e.name: e.value for e in entry_points(group="mlflow.run_context_provider")}
    assert evaluators["distillation"] == "kd_ops.evaluation.mlflow_evaluator:DistillationEvaluator"
    assert providers["kd_ops"] == "kd_ops.registry.lineage:LineageRunContext"
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry

    assert _model_evaluation_registry.is_registered("distillation")  # loaded by MLflow itself


def _frame(result) -> pd.DataFrame:
    x, y = result.datamodule.arrays("test")
    return pd.DataFrame(x, columns=[f"px{i}" for i in range(x.shape[1])]).assign(label=y)


def test_distillation_evaluator_logs_fidelity_retention_compression_speedup(distilled, tracking_uri):
    cfg, result = distilled
    client = MlflowClient(tracking_uri)
    teacher_uri = client.get_run(result.runs["teacher"]).data.tags["kd_ops.teacher_model_uri"]
    student_uri = f"models:/{cfg.registry.name}/{result.registered['version']}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("plugin-tests")
    # MLflow's two spellings: one evaluator by name with its config, or a list of evaluators with
    # a config per name (MLflow refuses a flat config beside a list).
    config = {"teacher": teacher_uri, "latency_repeats": 20}
    results = []
    for evaluators, evaluator_config in (("distillation", config), (["distillation"], {"distillation": config})):
        with mlflow.start_run() as run:
            results.append(
                mlflow.models.evaluate(
                    student_uri,
                    _frame(result),
                    targets="label",
                    model_type="classifier",
                    evaluators=evaluators,
                    evaluator_config=evaluator_config,
                )
            )
    first, out = results  # `run` is the second one's
    assert first.metrics["fidelity"] == out.metrics["fidelity"]
    logged = client.get_run(run.info.run_id).data
    for key in ("fidelity", "accuracy_retention", "compression_ratio", "speedup", "kl_teacher_student"):
        assert logged.metrics[key] == pytest.approx(out.metrics[key]), key
    s = result.metrics["student"]
    assert logged.metrics["fidelity"] == pytest.approx(s["agreement_with_teacher"])
    assert logged.metrics["student_accuracy"] == pytest.approx(s["test_accuracy"])
    assert logged.metrics["accuracy_retention"] == pytest.approx(s["accuracy_retention"])
    assert logged.metrics["compression_ratio"] == pytest.approx(s["compression_ratio"])
    assert logged.metrics["speedup"] > 1  # a 3x smaller network answers faster
    assert logged.metrics["kl_teacher_student"] > 0
    assert logged.tags["kd_ops.teacher_model_uri"] == teacher_uri
    assert "distillation_eval.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_evaluator_without_a_teacher_is_not_picked(distilled, tracking_uri):
    from mlflow.exceptions import MlflowException

    cfg, result = distilled
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(), pytest.raises(MlflowException, match="could not be evaluated"):
        mlflow.models.evaluate(
            f"models:/{cfg.registry.name}/{result.registered['version']}",
            _frame(result),
            targets="label",
            model_type="classifier",
            evaluators="distillation",
        )


def test_run_context_provider_tags_runs_inside_lineage_only(tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("plugin-tests")
    with lineage(teacher_model_uri="models:/t/1", dataset_fingerprint="abc"):
        with lineage(config_hash="123"):
            with mlflow.start_run() as inside:
                pass
    with mlflow.start_run() as outside:
        pass
    client = MlflowClient(tracking_uri)
    tags = client.get_run(inside.info.run_id).data.tags
    assert tags[TAG_PLUGIN] == "run_context_provider"  # set only by the provider, not by kd-ops code
    assert tags["kd_ops.teacher_model_uri"] == "models:/t/1"
    assert tags["kd_ops.dataset_fingerprint"] == "abc" and tags["kd_ops.config_hash"] == "123"
    assert not any(k.startswith("kd_ops.") for k in client.get_run(outside.info.run_id).data.tags)


def test_distillation_runs_carry_the_plugin_tag(distilled, tracking_uri):
    _, result = distilled
    client = MlflowClient(tracking_uri)
    for role in ("parent", "teacher", "baseline", "student"):
        tags = client.get_run(result.runs[role]).data.tags
        assert tags[TAG_PLUGIN] == "run_context_provider", role
        assert tags["kd_ops.dataset_fingerprint"] == result.datamodule.fingerprint()
    assert np.isfinite(result.metrics["student"]["peak_memory_bytes"])
