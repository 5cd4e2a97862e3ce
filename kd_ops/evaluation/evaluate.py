"""Evaluate any registered model on any split: the library side of `kd-ops evaluate`.

The same candidate metrics as a distillation logs (quality, per-slice accuracy, robustness,
efficiency), for a model URI that may come from anywhere: last month's champion on this month's
split, a student against a teacher it was not trained with, or the edge exports of either.
With `log=True` the figures go into an MLflow run of their own, next to MLflow's own classifier
evaluation (`mlflow.models.evaluate` on the predictions).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.errors import ConfigError
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.evaluation.metrics import EvaluationSettings, evaluate_candidate, model_candidate, student_extras
from kd_ops.models.loading import load_for_data

SPLITS = ("train", "transfer", "val", "test")


@dataclass
class ModelEvaluation:
    uri: str
    split: str
    metrics: dict[str, dict[str, float]]  # candidate name -> metrics ("model", "teacher", "onnx", ...)
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "split": self.split,
            **self.metrics,
            "confusion_matrix": self.confusion,
            "run_id": self.run_id,
        }


def evaluate_model(
    uri: str,
    cfg: ExperimentConfig,
    split: str = "test",
    teacher_uri: str | None = None,
    edge: tuple[str, ...] = (),
    log: bool = False,
    allow_pickle: bool | None = None,
) -> ModelEvaluation:
    """Score `uri` on `split` of the config's data; ConfigError for a URI or data that does not fit.

    `allow_pickle` (default: the config's `allow_pickle`) is consent to load model files whose
    loading runs code stored in them; without it such a model or teacher is a ConfigError."""
    if split not in SPLITS:
        raise ConfigError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
    from kd_ops.registry.tracking import open_tracking

    open_tracking(cfg.tracking.uri)  # models:/ and runs:/ URIs resolve in the config's store
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    allow = cfg.allow_pickle if allow_pickle is None else allow_pickle
    model = load_for_data(uri, dm, "model URI", allow_pickle=allow)
    teacher = load_for_data(teacher_uri, dm, "--teacher", allow_pickle=allow) if teacher_uri else None
    if edge and not isinstance(model, nn.Module):
        raise ConfigError(f"--edge: {uri!r} is not a PyTorch model; only networks have ONNX exports here")
    settings = EvaluationSettings.from_config(cfg.evaluation)
    out = ModelEvaluation(uri, split, {})
    acc_key = f"{split}_accuracy"

    preds: dict[str, np.ndarray] = {}

    def score(name: str, candidate) -> None:
        ev = evaluate_candidate(candidate, dm, settings, split)
        out.metrics[name], out.confusion[name] = ev.metrics, ev.confusion.tolist()
        preds[name] = ev.logits.argmax(1).numpy()

    score("model", model_candidate(model, "model"))
    if teacher is not None:
        score("teacher", model_candidate(teacher, "teacher"))
    if edge:
        from kd_ops.evaluation.edge import edge_candidates

        with tempfile.TemporaryDirectory(prefix="kd-ops-edge-") as tmp:
            for candidate, _ in edge_candidates(
                model, dm.arrays(split)[0], tmp, tuple(edge), settings.throughput_batch
            ):
                score(candidate.name, candidate)
    if teacher is not None:
        for name in [n for n in out.metrics if n != "teacher"]:
            agreement = float((preds[name] == preds["teacher"]).mean())
            out.metrics[name].update(
                student_extras(out.metrics[name], out.metrics["teacher"], agreement, accuracy_key=acc_key)
            )
    if log:
        out.run_id = _log_run(cfg, uri, teacher_uri, split, dm, preds["model"], out)
    return out


def _log_run(cfg: ExperimentConfig, uri: str, teacher_uri: str | None, split: str, dm, pred, result) -> str:
    """One MLflow run: kd-ops' metrics (teacher-relative ones included) and MLflow's classifier evaluation."""
    import mlflow
    import pandas as pd

    from kd_ops.registry import tracking
    from kd_ops.registry.lineage import lineage

    x, y = dm.arrays(split)
    experiment_id = tracking.use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    with (
        lineage(evaluated_model_uri=uri, teacher_model_uri=teacher_uri, dataset_fingerprint=dm.fingerprint()),
        mlflow.start_run(
            experiment_id=experiment_id, run_name=f"evaluate-{split}", tags={tracking.TAG_ROLE: "evaluation"}
        ) as run,
    ):
        mlflow.log_params({"model_uri": uri, "split": split, "data.name": cfg.data.name, "seed": cfg.seed})
        for name, metrics in result.metrics.items():
            mlflow.log_metrics({(k if name == "model" else f"{name}.{k}"): v for k, v in metrics.items() if v == v})
        mlflow.log_dict(result.confusion, "confusion_matrices.json")
        columns = [f"x{i}" for i in range(x.shape[1])]
        frame = pd.DataFrame(x, columns=columns).assign(label=y, prediction=pred)
        mlflow.models.evaluate(data=frame, predictions="prediction", targets="label", model_type="classifier")
        return run.info.run_id
