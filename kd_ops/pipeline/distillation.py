"""One distillation, end to end: teacher -> baseline -> student, tracked and registered.

This is the library entry point behind `kd-ops distill` (and later the Prefect flows): plain
functions over a validated config, with MLflow as the only side effect besides the teacher
output cache.

Run layout in MLflow: one parent run per call, with nested child runs `teacher`, `baseline`
and `student` that log the same metric names on the same test split. Several teachers appear
as runs nested under `teacher`; born-again generations as a chain of runs nested under
`student`, each generation inside the one that taught it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.loading import dump_config
from kd_ops.config.training import DistillConfig, ModelSection
from kd_ops.core.env import apply_offline_defaults
from kd_ops.core.errors import ConfigError
from kd_ops.data.datamodule import DistillDataModule, ExtraRows
from kd_ops.data.slicing import SLICES_ARTIFACT
from kd_ops.distill.losses import taps_of
from kd_ops.distill.module import DistillationModule
from kd_ops.distill.strategies import strategy_for
from kd_ops.evaluation.metrics import (
    Evaluation,
    EvaluationSettings,
    evaluate_candidate,
    model_candidate,
    quality_metrics,
    student_extras,
)
from kd_ops.evaluation.reference import build_reference, log_reference
from kd_ops.models.loading import load_for_data
from kd_ops.models.zoo import build_model, freeze
from kd_ops.registry import datasets, tracking
from kd_ops.registry.datasets import TEST, TRAINING, TRANSFER, VALIDATION, DatasetInput
from kd_ops.registry.lineage import lineage as lineage_scope

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """What a distillation produced; `to_json()` is the `--json` contract of the CLI."""

    metrics: dict[str, dict[str, float]]
    runs: dict[str, str]
    registered: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    gates: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict, repr=False)
    datamodule: DistillDataModule | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics)
        out["runs"] = self.runs
        out["registered"] = self.registered
        out["gates"] = self.gates
        return out


# -- training helpers ---------------------------------------------------------------------------


VALIDATIONS_PER_RUN = 50


def _trainer(cfg: ExperimentConfig, epochs: int, run_id: str) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        strategy=cfg.train.strategy,
        num_nodes=cfg.train.num_nodes,
        logger=MLFlowLogger(tracking_uri=cfg.tracking.uri, run_id=run_id),
        enable_checkpointing=False,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        deterministic=cfg.train.deterministic,
        log_every_n_steps=1,
        # About 50 validations a run: a tiny labelled set makes thousands of one-batch epochs,
        # and validating after each would cost more than the training itself.
        check_val_every_n_epoch=max(1, epochs // VALIDATIONS_PER_RUN),
    )


def _epochs(section: ModelSection, dm: DistillDataModule) -> int:
    """`epochs`, raised so that training makes at least `min_steps` optimizer steps.

    A 10% transfer set has a tenth of the steps per epoch; distillation in particular needs
    the updates, not the passes, so the step budget is what a config can pin.
    """
    n_rows = len(dm.rows(dm.role))
    steps_per_epoch = math.ceil(n_rows / dm.cfg.batch_size)
    return max(section.epochs, math.ceil(section.min_steps / steps_per_epoch))


def _fit(cfg: ExperimentConfig, module: L.LightningModule, dm: DistillDataModule, section: ModelSection) -> float:
    run_id = mlflow.active_run().info.run_id
    epochs = _epochs(section, dm)
    mlflow.log_param("effective_epochs", epochs)
    t0 = time.perf_counter()
    _trainer(cfg, epochs, run_id).fit(module, datamodule=dm)
    return time.perf_counter() - t0


def _fit_own_batches(cfg: ExperimentConfig, module: L.LightningModule, dm: DistillDataModule) -> float:
    """Train a module on the batches it makes itself (`module.synthetic_loader()`, for
    `module.epochs` epochs), validating on the real val split: a data-free student."""
    run_id = mlflow.active_run().info.run_id
    mlflow.log_param("effective_epochs", module.epochs)
    t0 = time.perf_counter()
    _trainer(cfg, module.epochs, run_id).fit(
        module, train_dataloaders=module.synthetic_loader(), val_dataloaders=dm.val_dataloader()
    )
    return time.perf_counter() - t0


def _section_params(section: ModelSection) -> dict[str, Any]:
    flat = {"model": section.model, "epochs": section.epochs, "min_steps": section.min_steps}
    flat.update({f"model.{k}": v for k, v in section.params.items()})
    return flat


def _new_model(section: ModelSection, dm: DistillDataModule, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mean, std = dm.normalization()
    try:
        return build_model(section.model, section.params, dm.input_shape, dm.n_classes, mean, std, table=dm.schema)
    except ValueError as exc:  # a network that does not fit the data (a CNN on a table)
        raise ConfigError(f"model {section.model!r} on data {dm.cfg.source_name!r}: {exc}") from None


def evaluate(cfg: ExperimentConfig, model: Any, dm: DistillDataModule, name: str = "model") -> Evaluation:
    """Test-split quality, robustness and CPU efficiency of a torch model or a scikit-learn estimator."""
    return evaluate_candidate(model_candidate(model, name), dm, EvaluationSettings.from_config(cfg.evaluation))


# -- teachers -----------------------------------------------------------------------------------


def _train_boosted_teacher(section: ModelSection, dm: DistillDataModule, seed: int, example) -> tuple[nn.Module, str]:
    """A boosted ensemble on the training split, early-stopped on the val split, registered in a
    format that loads without unpickling (a kd-ops table model, or LightGBM/XGBoost's own)."""
    from threadpoolctl import threadpool_limits

    from kd_ops.models.estimators import BOOSTED_TEACHERS, EstimatorTeacher

    entry = BOOSTED_TEACHERS.get(section.model)
    if dm.schema is not None and dm.schema.has_text and section.model != "pretrained_text":
        raise ConfigError(
            f"teacher.model = {section.model!r}: a boosted ensemble would read a text's token ids as numbers; "
            "on a table with text the teacher is a network (transformer) or pretrained_text"
        )
    (x, y), (xv, yv) = dm.arrays("train"), dm.arrays("val")
    mlflow.log_params({"model": section.model, **{f"model.{k}": v for k, v in section.params.items()}})
    t0 = time.perf_counter()
    with threadpool_limits(limits=2):
        fitted = entry.build(entry.params.model_validate(section.params), x, y, xv, yv, dm.schema, seed)
    mlflow.log_metric("train_time_s", time.perf_counter() - t0)
    for attr in ("best_iteration_", "best_iteration", "n_iter_"):
        if isinstance(getattr(fitted, attr, None), int):
            mlflow.log_metric("boosting_rounds", getattr(fitted, attr))
            break
    # The booster itself answers: LightGBM's and XGBoost's scikit-learn wrappers spend milliseconds
    # validating each call (4.7 ms against 0.3 ms for one row), which the teacher's latency would count.
    if hasattr(fitted, "booster_"):
        inner = fitted.booster_
    else:
        inner = fitted
        if hasattr(fitted, "get_booster"):  # XGBoost keeps the rounds after the best one: cut them
            best = getattr(fitted, "best_iteration", None)
            inner = fitted.get_booster()[: best + 1] if best is not None else fitted.get_booster()
    teacher = EstimatorTeacher(inner, name=section.model)
    return teacher, _log_model(teacher, dm, example).model_uri


def _log_model(model: Any, dm: DistillDataModule, example, registered_name: str | None = None):
    """A model into the active run, in the format that fits it: a kd-ops table model for a table
    (raw records in), else pt2 for a network, skops for an estimator, LightGBM's or XGBoost's own."""
    if dm.schema is not None:
        from kd_ops.models.table_flavor import log_table_model

        return log_table_model(model, dm.schema, example, registered_name=registered_name)
    if isinstance(model, nn.Module) and not hasattr(model, "estimator"):
        return tracking.log_torch_model(model, example, registered_name=registered_name)
    return tracking.log_sklearn_model(getattr(model, "estimator", model), example, registered_name=registered_name)


def _train_teacher(
    cfg: ExperimentConfig, section: ModelSection, dm: DistillDataModule, seed: int, example
) -> tuple[nn.Module, str]:
    from kd_ops.data.corruptions import corrupt_some
    from kd_ops.models.estimators import BOOSTED_TEACHERS

    if section.model in BOOSTED_TEACHERS:
        return _train_boosted_teacher(section, dm, seed, example)
    teacher = _new_model(section, dm, seed)
    augment = getattr(section, "augment", [])
    corrupt = corrupt_some(augment, section.augment_share, dm.raw, seed) if augment else None
    module = DistillationModule(teacher, lr=section.lr, weight_decay=section.weight_decay, corrupt=corrupt)
    mlflow.log_params(_section_params(section))
    mlflow.log_metric("train_time_s", _fit(cfg, module, dm, section))
    teacher = freeze(module.export())
    return teacher, _log_model(teacher, dm, example).model_uri


# -- the run ------------------------------------------------------------------------------------


@dataclass
class _Context:
    cfg: ExperimentConfig
    dm: DistillDataModule
    transfer_dm: DistillDataModule
    experiment_id: str
    lineage: dict[str, str]
    example: np.ndarray
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    registered: dict[str, Any] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # test-split logits per role (plots, agreement)
    gates: list[dict[str, Any]] = field(default_factory=list)
    reference_rows: tuple[np.ndarray, np.ndarray] | None = None  # default: the val split
    reference_known: np.ndarray | None = None  # which reference rows carry a true label (None: all)
    student_object: Any = None  # a network or estimator given through the Python API
    data: datasets.RunData | None = None  # the splits as MLflow datasets (each run's inputs)
    extra_inputs: list[DatasetInput] = field(default_factory=list)  # what `extra` rows were (production window)

    def child(self, name: str, role: str | None = None, **tags: str):
        return mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=name,
            nested=True,
            tags={tracking.TAG_ROLE: role or name, **self.lineage, **tags},
        )

    def log_inputs(self, *contexts: str | tuple[str, str], extra: bool = False) -> None:
        """The splits this run saw as its MLflow dataset inputs (see `kd_ops.registry.datasets`);
        `extra`: also the datasets the extra transfer rows came from."""
        if self.data is not None:
            datasets.log_inputs([*self.data.inputs(*contexts), *(self.extra_inputs if extra else [])])


# What each kind of run saw, as (context, split) pairs for `_Context.log_inputs`. The baseline
# learns the labels of the very rows the student distils on: the transfer set, as its training.
TRAINED_TEACHER_INPUTS = (TRAINING, VALIDATION, TEST)
LOADED_TEACHER_INPUTS = (TEST,)  # evaluated here, trained elsewhere: its training data is not known
BASELINE_INPUTS = ((TRAINING, "transfer"), VALIDATION, TEST)
STUDENT_INPUTS = (TRANSFER, VALIDATION, TEST)


def _summary(role: str, metrics: dict[str, float], seconds: float, how: str = "") -> None:
    """One INFO line at the end of a stage: the numbers a reader of the flow's log looks for."""
    parts = [f"test accuracy {metrics.get('test_accuracy', float('nan')):.3f}"]
    for key, label in (("agreement_with_teacher", "agreement"), ("accuracy_retention", "retention")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.3f}")
    if "compression_ratio" in metrics:
        parts.append(f"{metrics['compression_ratio']:.1f}x smaller")
    log.info("%s%s: %s, %.1f s", role, f" ({how})" if how else "", ", ".join(parts), seconds)


def _teacher_stage(ctx: _Context, loaded: dict[int, nn.Module]) -> nn.Module:
    """Train or load every teacher; several become one `TeacherEnsemble`."""
    cfg = ctx.cfg
    sections = [cfg.teacher, *cfg.teachers]
    t0 = time.perf_counter()
    with ctx.child("teacher") as run:
        ctx.runs["teacher"] = run.info.run_id
        ctx.log_inputs(*(LOADED_TEACHER_INPUTS if len(loaded) == len(sections) else TRAINED_TEACHER_INPUTS))
        members, uris = [], []
        for i, section in enumerate(sections):
            several = len(sections) > 1
            with ctx.child(f"teacher-{i}", role="teacher-member") if several else contextlib.nullcontext():
                if several:
                    ctx.log_inputs(*(LOADED_TEACHER_INPUTS if i in loaded else TRAINED_TEACHER_INPUTS))
                if i in loaded:
                    model, uri = loaded[i]
                    mlflow.log_params({"model": "loaded", "uri": uri})
                else:
                    model, uri = _train_teacher(cfg, section, ctx.dm, cfg.seed + 100 * i, ctx.example)
                if several:
                    mlflow.set_tag(tracking.TAG_TEACHER_URI, uri)
                    mlflow.log_metrics(evaluate(cfg, model, ctx.dm).metrics)
            members.append(model)
            uris.append(uri)
        if len(members) == 1:
            teacher = members[0]
        else:
            from kd_ops.models.ensemble import TeacherEnsemble

            teacher = freeze(TeacherEnsemble(members, cfg.distill.combine, cfg.distill.teacher_weights))
            mlflow.log_params({"combine": cfg.distill.combine, "members": len(members)})
        teacher_uri = ",".join(uris)
        mlflow.set_tag(tracking.TAG_TEACHER_URI, teacher_uri)
        _log_evaluation(ctx, "teacher", evaluate(cfg, teacher, ctx.dm))
    if len(sections) > 1:
        how = f"ensemble of {len(sections)}, {cfg.distill.combine}"
    else:
        how = f"loaded {teacher_uri}" if loaded else "trained"
    _summary("teacher", ctx.metrics["teacher"], time.perf_counter() - t0, how)
    ctx.lineage[tracking.TAG_TEACHER_URI] = teacher_uri
    mlflow.set_tag(tracking.TAG_TEACHER_URI, teacher_uri)
    ctx.models["teacher"] = teacher
    return teacher


def _vs_teacher(ctx: _Context, ev: Evaluation) -> dict[str, float]:
    """Agreement, retention, compression and speedup of a student (or an export of it) against the teacher."""
    agreement = float((ev.logits.numpy().argmax(1) == ctx.logits["teacher"].argmax(1)).mean())
    return student_extras(ev.metrics, ctx.metrics["teacher"], agreement)


def _log_evaluation(ctx: _Context, role: str, ev: Evaluation, extra: dict[str, float] | None = None) -> None:
    """Metrics (and the confusion matrix as a JSON artifact) of one role, into the active run."""
    metrics = {**ev.metrics, **(extra or {})}
    mlflow.log_metrics(metrics)
    mlflow.log_dict({"rows_true_columns_predicted": ev.confusion.tolist()}, "confusion_matrix.json")
    ctx.metrics[role] = metrics
    ctx.logits[role] = ev.logits.numpy()


def _teacher_outputs(
    ctx: _Context, teacher: nn.Module, terms, method_cfg: DistillConfig
) -> dict[str, torch.Tensor] | None:
    """Teacher outputs over the transfer rows, from the on-disk cache; None when inputs change each step."""
    cache_cfg = method_cfg.cache
    if not cache_cfg.enabled or not any(t.needs_teacher for t in terms):
        return None
    changing = {k: getattr(method_cfg, k) for k in ("mixup", "cutmix", "swap_noise", "jitter")}
    if any(changing.values()):
        log.warning(
            "teacher-output cache bypassed: inputs change every step (%s); the teacher runs each step",
            ", ".join(f"{k}={v}" for k, v in changing.items() if v),
        )
        mlflow.set_tag("kd_ops.teacher_cache", "bypassed: augmentation")
        return None
    from kd_ops.distill.cache import CacheKey, TeacherCache, compute_teacher_outputs, model_fingerprint
    from kd_ops.distill.taps import tapped

    paths = taps_of(terms, "teacher")
    rows = ctx.transfer_dm.splits.transfer
    x = torch.as_tensor(ctx.dm.raw.x[rows])
    key = CacheKey(
        teacher_fingerprint=model_fingerprint(teacher),
        dataset_fingerprint=f"{ctx.dm.fingerprint()}:transfer",
        transform=f"identity;{getattr(teacher, 'combine', 'single')}",
        taps=tuple(paths),
        top_k=cache_cfg.top_k,
    )
    cache = TeacherCache(cache_cfg.dir)

    def compute() -> dict[str, torch.Tensor]:
        from kd_ops.distill.distributed import distributed_teacher_outputs, world_size

        processes = world_size(ctx.cfg.train)
        mlflow.set_tag("kd_ops.teacher_cache_processes", str(processes))
        if processes > 1:  # computed by every process, merged and written once by this one
            return distributed_teacher_outputs(teacher, x, ctx.cfg.train, paths)
        if not paths:
            return compute_teacher_outputs(teacher, x)
        with tapped(teacher, paths, "teacher") as tap:
            return compute_teacher_outputs(teacher, x, features=lambda _: dict(tap.features))

    t0 = time.perf_counter()
    outputs = cache.get_or_compute(key, compute)
    hit = cache.hits > 0
    mlflow.set_tags({"kd_ops.teacher_cache": "hit" if hit else "miss", "kd_ops.teacher_cache_key": key.digest()})
    mlflow.log_metric("teacher_cache_s", time.perf_counter() - t0)
    log.info("teacher outputs %s from cache %s", "read" if hit else "written", cache.path_for(key))
    return outputs


class _Trainer:
    """The pipeline's side of `kd_ops.distill.strategies.StudentTrainer`: training inside this run."""

    def __init__(self, ctx: _Context):
        self.ctx, self.cfg, self.dm = ctx, ctx.cfg, ctx.dm

    def new_student(self, seed_offset: int) -> nn.Module:
        given = self.ctx.student_object
        if isinstance(given, nn.Module):  # the user's network: every student starts from its weights
            return copy.deepcopy(given)
        return _new_model(self.cfg.student, self.dm, self.cfg.seed + seed_offset)

    @property
    def student_estimator(self) -> Any:
        """The user's estimator (Python API), which the `sklearn` method fits instead of a named one."""
        given = self.ctx.student_object
        return None if given is None or isinstance(given, nn.Module) else given

    def student_params(self) -> dict[str, Any]:
        if self.ctx.student_object is not None:
            from kd_ops.pipeline.inputs import describe

            return {"model": describe(self.ctx.student_object)}
        return _section_params(self.cfg.student)

    def module_kwargs(self, method_cfg: DistillConfig) -> dict[str, Any]:
        return dict(
            ce_weight=method_cfg.ce_weight,
            lr=self.cfg.student.lr,
            weight_decay=self.cfg.student.weight_decay,
            jitter=method_cfg.jitter,
            mixup=method_cfg.mixup,
            cutmix=method_cfg.cutmix,
            swap_noise=method_cfg.swap_noise,
            input_shape=self.dm.input_shape if method_cfg.cutmix else None,
            rows=self.ctx.transfer_dm.splits.transfer,
        )

    def distillation_module(
        self, student: nn.Module, teacher: nn.Module | None, method_cfg: DistillConfig, terms: list
    ) -> DistillationModule:
        common = self.module_kwargs(method_cfg)
        if not terms:
            common["ce_weight"] = 1.0
            return DistillationModule(student, **common)
        try:
            outputs = _teacher_outputs(self.ctx, teacher, terms, method_cfg)
            module = DistillationModule(student, teacher, terms, teacher_outputs=outputs, **common)
            module.prepare(torch.as_tensor(self.ctx.example[:4]))
        except ValueError as exc:  # a tap path that does not exist, shapes that cannot be connected
            raise ConfigError(
                f"distill.method = {method_cfg.method!r} (losses {[t.loss_name for t in terms]}): {exc}"
            ) from None
        return module

    def fit(self, module: L.LightningModule, rows: str = "transfer") -> float:
        L.seed_everything(self.cfg.seed + 2, workers=True, verbose=False)
        try:
            if rows == "none":  # the module brings its own batches (synthetic inputs): no training row is read
                return _fit_own_batches(self.cfg, module, self.ctx.transfer_dm)
            dm = self.ctx.transfer_dm if rows == "transfer" else self.ctx.transfer_dm.with_role(rows)
            return _fit(self.cfg, module, dm, self.cfg.student)
        finally:
            if hasattr(module, "close"):
                module.close()

    def evaluate(self, model: Any) -> dict[str, float]:
        return evaluate(self.cfg, model, self.dm).metrics

    @contextlib.contextmanager
    def child_run(self, name: str, role: str, **tags: str):
        """A strategy's nested run (a born-again generation): it distils on the transfer set too."""
        with self.ctx.child(name, role=role, **tags) as run:
            self.ctx.log_inputs(*STUDENT_INPUTS)
            yield run


def _student_stage(
    ctx: _Context, role: str, teacher: nn.Module, method_cfg: DistillConfig, initial: nn.Module | None
) -> None:
    cfg = ctx.cfg
    strategy = strategy_for(method_cfg)
    with ctx.child(role) as run:
        ctx.runs[role] = run.info.run_id
        if role == "student":
            ctx.log_inputs(*STUDENT_INPUTS, extra=True)
        elif ctx.dm.splits.labelled is not None:  # the labels-only student saw the labelled rows alone
            ctx.log_inputs((TRAINING, "labelled"), VALIDATION, TEST)
        else:
            ctx.log_inputs(*BASELINE_INPUTS)
        mlflow.log_params({**_Trainer(ctx).student_params(), **strategy.run_params()})
        student, seconds = strategy.train(_Trainer(ctx), teacher if strategy.needs_teacher else None, initial)
        ev = evaluate(cfg, student, ctx.dm)
        _log_evaluation(ctx, role, ev, {**_vs_teacher(ctx, ev), "train_time_s": seconds})
        _summary(role, ctx.metrics[role], seconds, cfg.distill.method if role == "student" else "labels only")
        ctx.models[role] = student
        if role == "student":
            _register(ctx, student)


def _register(ctx: _Context, student: Any) -> None:
    cfg = ctx.cfg
    # Before the version exists: a served version always finds how to slice its traffic, and a
    # monitor always finds the reference to compare that traffic with.
    mlflow.log_dict(ctx.dm.input_slices().to_dict(), SLICES_ARTIFACT)
    rows = ctx.reference_rows
    split = "production" if rows is not None else "val"
    log_reference(build_reference(student, ctx.models.get("teacher"), ctx.dm, split, rows, ctx.reference_known))
    info = _log_model(student, ctx.dm, ctx.example, registered_name=cfg.registry.name)
    ctx.registered.update(name=cfg.registry.name, version=str(info.registered_model_version), model_uri=info.model_uri)


def run_distillation(
    cfg: ExperimentConfig,
    teacher: Any = None,
    student: Any = None,
    data: Any = None,
    *,
    extra: ExtraRows | None = None,
    tags: dict[str, str] | None = None,
    reference: ExtraRows | None = None,
    extra_inputs: list[DatasetInput] | None = None,
) -> DistillResult:
    """Train (or load) the teacher, the labels-only baseline and the distilled student.

    Your own objects, each winning over its config section (and recorded in the run's params and
    lineage by class name or URI):
    - `teacher`: a torch module or LightningModule, an estimator with `predict_proba` (on a table it
      gets your DataFrame's columns and types), or an MLflow model URI;
    - `student`: a torch module (checked to export with torch.export before training) or a
      scikit-learn estimator (fitted on the teacher's soft targets by the `sklearn` method);
    - `data`: a pandas DataFrame (read with the config's `data.*` keys: `data.label` at least) or a
      LightningDataModule (its train, val and test loaders are the splits).

    `extra` rows join the transfer set (re-distillation: recent production inputs labelled by the
    teacher); `tags` go on the parent run and the registered version (why this run happened);
    `reference` rows replace the val split as the reference stored for monitoring;
    `extra_inputs` are MLflow datasets that say where the `extra` rows came from (the production
    window, `kd_ops.registry.datasets.production_window`), inputs of the student and parent runs.
    Every run logs the splits it saw as MLflow dataset inputs (`kd_ops.registry.datasets`)."""
    from kd_ops.pipeline import inputs

    given_student = student
    apply_offline_defaults()
    tracking.open_tracking(cfg.tracking.uri)  # before a teacher URI is resolved: models:/ goes there too
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = inputs.data_module(cfg, data, extra)
    cfg = inputs.table_defaults(cfg, dm)
    if student is not None:
        student = inputs.student_object(student, dm, cfg.seed + 1)
        if inputs.is_estimator(student) and cfg.distill.method != "sklearn":
            cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"method": "sklearn"})})
    _check_teacher_kinds(cfg, teacher)
    # Teacher URIs that do not resolve or do not fit the data fail before any run exists; so does
    # a teacher whose loading would run code stored in its file, unless cfg.allow_pickle.
    sections = [cfg.teacher, *cfg.teachers]
    loaded: dict[int, tuple[nn.Module, str]] = {
        i: (
            load_for_data(
                s.uri,
                dm,
                "teacher.uri" if i == 0 else f"teachers.{i - 1}.uri",
                torch_only=True,
                allow_pickle=cfg.allow_pickle,
            ),
            s.uri,
        )
        for i, s in enumerate(sections)
        if s.uri
    }
    if teacher is not None:
        loaded[0] = (inputs.teacher_object(teacher, dm, cfg.allow_pickle), inputs.describe(teacher))
    _check_feature_losses(cfg, loaded)
    experiment_id = tracking.use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    lineage = {
        tracking.TAG_DATASET: dm.fingerprint(),
        tracking.TAG_CONFIG_HASH: cfg.hash(),
        tracking.TAG_CODE_VERSION: tracking.code_version(),
    }
    ctx = _Context(cfg, dm, dm.with_role("transfer"), experiment_id, lineage, dm.arrays("val")[0][:5])
    ctx.student_object = student
    ctx.data = datasets.RunData(dm, lineage[tracking.TAG_DATASET], inputs.describe(data) if data is not None else None)
    ctx.extra_inputs = list(extra_inputs or [])
    if reference is not None:
        ctx.reference_rows = (reference.x, reference.y)
        ctx.reference_known = reference.known

    run_name = f"{dm.raw.name if data is not None else cfg.data.source_name}-{cfg.distill.method}-seed{cfg.seed}"
    from kd_ops.serving.state import masked

    uri = cfg.tracking.uri
    n_extra = 0 if extra is None else len(extra.y)
    log.info(
        "distilling %s into experiment %r at %s: %d train, %d transfer%s, %d val, %d test rows",
        run_name,
        cfg.tracking.experiment,
        masked(uri) if "://" in uri else uri,  # a password in a server URL never reaches a log
        len(dm.splits.train),
        len(dm.splits.transfer),
        "".join(
            [
                f" ({n_extra} of them extra)" if n_extra else "",
                f" ({len(dm.splits.labelled)} of them labelled)" if dm.splits.labelled is not None else "",
            ]
        ),
        len(dm.splits.val),
        len(dm.splits.test),
    )
    t0 = time.perf_counter()
    with (
        lineage_scope(**ctx.lineage),
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags={tracking.TAG_ROLE: "parent", **ctx.lineage, **(tags or {})},
        ) as parent,
    ):
        ctx.runs["parent"] = parent.info.run_id
        ctx.log_inputs(TRAINING, TRANSFER, VALIDATION, TEST, extra=True)
        mlflow.log_params(cfg.flat())
        objects = {"teacher": teacher, "student": given_student, "data": data}
        mlflow.log_params({f"api.{k}": inputs.describe(v) for k, v in objects.items() if v is not None})
        mlflow.log_text(dump_config(cfg), "config.yaml")
        mlflow.log_dict(
            {
                **{part: len(getattr(dm.splits, part)) for part in ("train", "transfer", "val", "test")},
                "extra_transfer_rows": 0 if extra is None else len(extra.y),
            },
            "splits.json",
        )

        teacher = _teacher_stage(ctx, loaded)
        strategy = strategy_for(cfg.distill)
        # Baseline and student start from the same initial weights: the loss is the only difference.
        initial = _Trainer(ctx).new_student(1) if strategy.network_student else None
        if cfg.distill.baseline:
            _student_stage(ctx, "baseline", teacher, strategy.baseline(), initial)
        _student_stage(ctx, "student", teacher, cfg.distill, initial)
        if cfg.evaluation.edge and isinstance(ctx.models["student"], nn.Module):
            _edge_stage(ctx)

        tracking.register_with_alias(
            cfg.registry.name,
            ctx.registered["version"],
            cfg.registry.alias,
            tags={
                **ctx.lineage,
                **(tags or {}),
                "kd_ops.method": cfg.distill.method,
                "kd_ops.student_run_id": ctx.runs["student"],
            },
        )
        ctx.registered["alias"] = cfg.registry.alias
        log.info(
            "registered %s v%s as @%s (%s)",
            cfg.registry.name,
            ctx.registered["version"],
            cfg.registry.alias,
            ctx.registered["model_uri"],
        )
        _gate_stage(ctx)
        _figures_and_card(ctx)
        mlflow.log_dict(ctx.metrics, "metrics.json")
    log.info("distilled %s in %.1f s: parent run %s", run_name, time.perf_counter() - t0, ctx.runs["parent"])

    return DistillResult(
        ctx.metrics, ctx.runs, ctx.registered, cfg.tracking.uri, experiment_id, ctx.gates, ctx.models, dm
    )


def _check_teacher_kinds(cfg: ExperimentConfig, teacher: Any) -> None:
    """A boosted teacher trained here has no layers: feature-based losses are refused by name."""
    from kd_ops.models.estimators import BOOSTED_TEACHERS

    for i, section in enumerate([cfg.teacher, *cfg.teachers]):
        if section.uri or (i == 0 and teacher is not None) or section.model not in BOOSTED_TEACHERS:
            continue
        _refuse_feature_losses(cfg, f"{'teacher' if i == 0 else f'teachers.{i - 1}'}.model = {section.model!r}")


def _check_feature_losses(cfg: ExperimentConfig, loaded: dict[int, tuple[nn.Module, str]]) -> None:
    from kd_ops.models.estimators import EstimatorTeacher

    for i, (model, uri) in loaded.items():
        if isinstance(model, EstimatorTeacher):
            _refuse_feature_losses(cfg, f"teacher {uri!r} ({model.name or type(model.estimator).__name__})")


def _refuse_feature_losses(cfg: ExperimentConfig, what: str) -> None:
    terms = strategy_for(cfg.distill).loss_terms()
    tapping = [t.loss_name for t in terms if taps_of([t], "teacher")]
    if tapping:
        raise ConfigError(
            f"distill: the feature-based losses {tapping} read the teacher's layers, and {what} is not a "
            "network; use response losses (kd, dkd, ...) or a PyTorch teacher"
        )


def _edge_stage(ctx: _Context) -> None:
    """ONNX (and int8) exports of the student, each a nested run with the same metrics and its file."""
    import tempfile

    from kd_ops.evaluation.edge import edge_candidates

    student = ctx.models["student"]
    with tempfile.TemporaryDirectory(prefix="kd-ops-edge-") as tmp:
        for candidate, path in edge_candidates(
            student, ctx.example, tmp, tuple(ctx.cfg.evaluation.edge), ctx.cfg.evaluation.throughput_batch
        ):
            role = f"student-{candidate.name}"
            with ctx.child(role, role="edge", **{"kd_ops.edge_format": candidate.name}) as run:
                ctx.runs[role] = run.info.run_id
                ctx.log_inputs(TEST)
                t0 = time.perf_counter()
                ev = evaluate_candidate(candidate, ctx.dm, EvaluationSettings.from_config(ctx.cfg.evaluation))
                _log_evaluation(ctx, role, ev, _vs_teacher(ctx, ev))
                _summary(role, ctx.metrics[role], time.perf_counter() - t0, "export")
                mlflow.log_artifact(str(path), "edge")


def _gate_stage(ctx: _Context) -> None:
    """Decide the gates on the student's metrics, record them, and promote when all pass."""
    from mlflow.tracking import MlflowClient

    from kd_ops.registry import gates, promotion

    cfg, reg = ctx.cfg, ctx.registered
    specials: dict[str, tuple[float | None, str]] = {}
    if "max_slice_drop_vs_champion" in cfg.gates:
        specials["slice_drop_vs_champion"] = _champion_slice_drop(ctx)
    decisions = gates.check(cfg.gates, ctx.metrics["student"], specials)
    client = MlflowClient(cfg.tracking.uri)
    gates.record(decisions, client, ctx.runs["student"], reg["name"], reg["version"])
    gates.log_decisions(decisions)
    ctx.gates = gates.as_json(decisions)
    reg["gates"] = "passed" if gates.all_passed(decisions) else "failed"
    reg["promoted"] = False
    subject = f"{reg['name']} v{reg['version']}"
    failed = [d.gate for d in decisions if not d.passed]
    if failed:
        log.info("%s stays @%s: gate(s) failed: %s", subject, cfg.registry.alias, ", ".join(failed))
    elif not cfg.registry.promote:
        log.info("%s stays @%s: gates passed, registry.promote is false", subject, cfg.registry.alias)
    else:  # promote() says so, and which version was champion before
        promotion.promote(reg["name"], reg["version"], uri=cfg.tracking.uri)
        reg["promoted"] = True
    reg["champion"] = promotion.state(reg["name"], client).champion


def _champion_slice_drop(ctx: _Context) -> tuple[float | None, str]:
    """The current champion scored on this run's test rows, against the new student."""
    from kd_ops.registry import gates
    from kd_ops.registry.promotion import CHAMPION, state

    name = ctx.cfg.registry.name
    champion = state(name).champion
    if champion is None:
        return None, "no champion yet"
    uri = f"models:/{name}@{CHAMPION}"
    try:
        model = load_for_data(uri, ctx.dm, "champion", allow_pickle=ctx.cfg.allow_pickle)
    except ConfigError as exc:
        return None, f"champion v{champion} cannot be scored on this data: {exc}"
    x, y = ctx.dm.arrays("test")
    logits = torch.as_tensor(model_candidate(model, "champion").predict(x))
    champion_metrics = quality_metrics(logits, y, ctx.dm.slices("test"))
    value, note = gates.slice_drop(ctx.metrics["student"], champion_metrics)
    return value, f"vs champion v{champion}, {note}"


def _figures_and_card(ctx: _Context) -> None:
    """PNG figures into the parent run; the model card onto the student run and the model version."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from kd_ops.evaluation import plots
    from kd_ops.registry import model_card

    cfg, reg = ctx.cfg, ctx.registered
    _, y = ctx.dm.arrays("test")
    with tempfile.TemporaryDirectory(prefix="kd-ops-plots-") as tmp:
        for path in plots.all_figures(ctx.metrics, ctx.logits, y, Path(tmp)):
            mlflow.log_artifact(str(path), "plots")
    card = model_card.render(
        name=reg["name"],
        version=reg["version"],
        student=strategy_for(cfg.distill).student_name(cfg),
        method=cfg.distill.method,
        temperature=cfg.distill.temperature,
        teacher_uri=ctx.lineage[tracking.TAG_TEACHER_URI],
        data=cfg.data.model_dump(),
        lineage=ctx.lineage,
        metrics=ctx.metrics,
        gates=ctx.gates,
        promoted=reg.get("promoted") if cfg.registry.promote else None,
        run_id=ctx.runs["student"],
    )
    client = MlflowClient(cfg.tracking.uri)
    client.log_text(ctx.runs["student"], card, "model_card.md")
    client.update_model_version(reg["name"], reg["version"], description=card)


__all__ = ["DistillResult", "evaluate", "run_distillation"]
