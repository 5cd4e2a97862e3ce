"""One distillation, end to end: teacher -> baseline -> student, tracked and registered.

This is the library entry point behind `kd-ops distill` (and later the Prefect flows): plain
functions over a validated config, with MLflow as the only side effect.

Run layout in MLflow: one parent run per call, with nested child runs `teacher`, `baseline`
and `student` that log the same metric names on the same test split.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import mlflow
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn

from kd_ops import tracking
from kd_ops.config import ConfigError, ExperimentConfig, ModelSection, dump_config
from kd_ops.data import DistillDataModule
from kd_ops.distill import DistillationModule
from kd_ops.env import apply_offline_defaults
from kd_ops.evaluation import efficiency_metrics, predict_logits, quality_metrics, student_extras
from kd_ops.losses import loss_terms
from kd_ops.models import build_model, freeze

log = logging.getLogger("kd_ops")


@dataclass
class DistillResult:
    """What a distillation produced; `to_json()` is the `--json` contract of the CLI."""

    metrics: dict[str, dict[str, float]]
    runs: dict[str, str]
    registered: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    datamodule: DistillDataModule | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {role: self.metrics[role] for role in ("teacher", "baseline", "student") if role in self.metrics}
        out["runs"] = self.runs
        out["registered"] = self.registered
        return out


def _trainer(cfg: ExperimentConfig, epochs: int, run_id: str) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        logger=MLFlowLogger(tracking_uri=cfg.tracking.uri, run_id=run_id),
        enable_checkpointing=False,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        deterministic=cfg.train.deterministic,
        log_every_n_steps=1,
    )


def _epochs(section: ModelSection, dm: DistillDataModule) -> int:
    """`epochs`, raised so that training makes at least `min_steps` optimizer steps.

    A 10% transfer set has a tenth of the steps per epoch; distillation in particular needs
    the updates, not the passes, so the step budget is what a config can pin.
    """
    n_rows = len(getattr(dm.splits, dm.role))
    steps_per_epoch = math.ceil(n_rows / dm.cfg.batch_size)
    return max(section.epochs, math.ceil(section.min_steps / steps_per_epoch))


def _fit(cfg: ExperimentConfig, module: DistillationModule, dm: DistillDataModule, section: ModelSection) -> float:
    run_id = mlflow.active_run().info.run_id
    epochs = _epochs(section, dm)
    mlflow.log_param("effective_epochs", epochs)
    t0 = time.perf_counter()
    _trainer(cfg, epochs, run_id).fit(module, datamodule=dm)
    return time.perf_counter() - t0


def _section_params(section: ModelSection) -> dict[str, Any]:
    flat = {"model": section.model, "epochs": section.epochs, "min_steps": section.min_steps}
    flat.update({f"model.{k}": v for k, v in section.params.items()})
    return flat


def _evaluate(cfg: ExperimentConfig, model: nn.Module, dm: DistillDataModule) -> tuple[dict[str, float], torch.Tensor]:
    x, y = dm.arrays("test")
    logits = predict_logits(model, x)
    metrics = quality_metrics(logits, y, dm.slices("test"))
    metrics.update(
        efficiency_metrics(
            model,
            dm.n_features,
            latency_repeats=cfg.evaluation.latency_repeats,
            throughput_batch=cfg.evaluation.throughput_batch,
            throughput_repeats=cfg.evaluation.throughput_repeats,
        )
    )
    return metrics, logits


def _load_teacher(uri: str, dm: DistillDataModule) -> nn.Module:
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(uri)
    except Exception as exc:  # MLflow raises several types for a URI that does not resolve
        raise ConfigError(f"teacher.uri = {uri!r}: cannot load it as a PyTorch model: {exc}") from None
    freeze(model)
    probe = torch.as_tensor(dm.arrays("val")[0][:2])
    try:
        with torch.inference_mode():
            out = model(probe)
    except Exception as exc:
        raise ConfigError(
            f"teacher.uri = {uri!r}: the model does not accept rows of {dm.n_features} features "
            f"from data.name = {dm.cfg.name!r}: {exc}"
        ) from None
    if out.ndim != 2 or out.shape[1] != dm.n_classes:
        raise ConfigError(
            f"teacher.uri = {uri!r}: the model outputs shape {tuple(out.shape)}, "
            f"expected (batch, {dm.n_classes}) for data.name = {dm.cfg.name!r}"
        )
    return model


def _new_model(section: ModelSection, dm: DistillDataModule, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mean, std = dm.normalization()
    return build_model(section.model, section.params, dm.input_shape, dm.n_classes, mean, std)


def run_distillation(cfg: ExperimentConfig) -> DistillResult:
    """Train (or load) the teacher, the labels-only baseline and the distilled student."""
    apply_offline_defaults()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    transfer_dm = dm.with_role("transfer")
    experiment_id = tracking.use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    fingerprint, config_hash = dm.fingerprint(), cfg.hash()
    lineage = {
        tracking.TAG_DATASET: fingerprint,
        tracking.TAG_CONFIG_HASH: config_hash,
        tracking.TAG_CODE_VERSION: tracking.code_version(),
    }
    metrics: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    models: dict[str, nn.Module] = {}
    registered: dict[str, Any] = {}
    example = dm.arrays("val")[0][:5]

    # A teacher URI that does not resolve or does not fit the data fails before any run exists.
    loaded_teacher = _load_teacher(cfg.teacher.uri, dm) if cfg.teacher.uri else None

    run_name = f"{cfg.data.name}-{cfg.distill.method}-seed{cfg.seed}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={tracking.TAG_ROLE: "parent", **lineage}) as parent:
        runs["parent"] = parent.info.run_id
        mlflow.log_params(cfg.flat())
        mlflow.log_text(dump_config(cfg), "config.yaml")
        mlflow.log_dict(
            {"train": len(dm.splits.train), "transfer": len(dm.splits.transfer), "val": len(dm.splits.val), "test": len(dm.splits.test)},
            "splits.json",
        )

        # -- teacher -------------------------------------------------------------------------
        with mlflow.start_run(experiment_id=experiment_id, run_name="teacher", nested=True, tags={tracking.TAG_ROLE: "teacher", **lineage}) as run:
            runs["teacher"] = run.info.run_id
            if cfg.teacher.uri:
                teacher, teacher_uri = loaded_teacher, cfg.teacher.uri
                mlflow.log_params({"model": "loaded", "uri": teacher_uri})
            else:
                teacher = _new_model(cfg.teacher, dm, cfg.seed)
                module = DistillationModule(teacher, lr=cfg.teacher.lr, weight_decay=cfg.teacher.weight_decay)
                mlflow.log_params(_section_params(cfg.teacher))
                train_time = _fit(cfg, module, dm, cfg.teacher)
                teacher = module.export()
                mlflow.log_metric("train_time_s", train_time)
                teacher_uri = tracking.log_torch_model(teacher, example).model_uri
            mlflow.set_tag(tracking.TAG_TEACHER_URI, teacher_uri)
            metrics["teacher"], teacher_logits = _evaluate(cfg, teacher, dm)
            mlflow.log_metrics(metrics["teacher"])
            models["teacher"] = teacher
        lineage[tracking.TAG_TEACHER_URI] = teacher_uri
        mlflow.set_tag(tracking.TAG_TEACHER_URI, teacher_uri)
        teacher_pred = teacher_logits.argmax(1)

        # Baseline and student start from the same initial weights: the loss is the only difference.
        initial_student = _new_model(cfg.student, dm, cfg.seed + 1)

        def train_student(role: str, method_cfg) -> None:
            with mlflow.start_run(experiment_id=experiment_id, run_name=role, nested=True, tags={tracking.TAG_ROLE: role, **lineage}) as run:
                runs[role] = run.info.run_id
                terms = loss_terms(method_cfg)
                ce_weight = method_cfg.ce_weight if terms else 1.0
                mlflow.log_params({**_section_params(cfg.student), "method": method_cfg.method, "temperature": method_cfg.temperature, "kd_weight": method_cfg.kd_weight if terms else 0.0})
                module = DistillationModule(
                    copy.deepcopy(initial_student),
                    teacher=teacher if terms else None,
                    terms=terms,
                    ce_weight=ce_weight,
                    lr=cfg.student.lr,
                    weight_decay=cfg.student.weight_decay,
                    jitter=cfg.distill.jitter,
                    mixup=cfg.distill.mixup,
                )
                L.seed_everything(cfg.seed + 2, workers=True, verbose=False)
                train_time = _fit(cfg, module, transfer_dm, cfg.student)
                student = module.export()
                m, logits = _evaluate(cfg, student, dm)
                m.update(student_extras(m, metrics["teacher"], float((logits.argmax(1) == teacher_pred).float().mean())))
                m["train_time_s"] = train_time
                mlflow.log_metrics(m)
                metrics[role] = m
                models[role] = student
                if role == "student":
                    info = tracking.log_torch_model(student, example, registered_name=cfg.registry.name)
                    registered.update(name=cfg.registry.name, version=str(info.registered_model_version), model_uri=info.model_uri)

        if cfg.distill.baseline:
            train_student("baseline", cfg.distill.model_copy(update={"method": "none"}))
        train_student("student", cfg.distill)

        tracking.register_with_alias(
            cfg.registry.name,
            registered["version"],
            cfg.registry.alias,
            tags={**lineage, "kd_ops.method": cfg.distill.method, "kd_ops.student_run_id": runs["student"]},
            description=_describe(cfg, metrics, teacher_uri),
        )
        registered["alias"] = cfg.registry.alias
        mlflow.log_dict(metrics, "metrics.json")

    return DistillResult(metrics, runs, registered, cfg.tracking.uri, experiment_id, models, dm)


def _describe(cfg: ExperimentConfig, metrics: dict[str, dict[str, float]], teacher_uri: str) -> str:
    s, t = metrics["student"], metrics["teacher"]
    return (
        f"{cfg.student.model} student distilled ({cfg.distill.method}, T={cfg.distill.temperature}) from {teacher_uri} "
        f"on {cfg.data.name} (train_fraction={cfg.data.train_fraction}). "
        f"Test accuracy {s['test_accuracy']:.4f} vs teacher {t['test_accuracy']:.4f}; "
        f"{s['compression_ratio']:.1f}x fewer parameters, {s['speedup']:.1f}x faster at batch 1."
    )
