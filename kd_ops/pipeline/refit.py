"""A teacher refreshed on what has happened since it was trained (`redistill.teacher: refit`).

A teacher goes stale too: when the traffic's relation between inputs and labels moves (a season,
a carrier's new schedule), relabelling recent rows with the old teacher teaches the new student
the old relation. With `refit`, the teacher's recipe (`teacher.model`, `teacher.params`) is fitted
again on its training split plus the recent rows whose feedback labels have arrived. Those rows
are all older than the moment the re-distillation runs (they are in the prediction log), so
nothing is learnt from the future; the rows held out to gate the new student are never among them.
The refitted teacher is scored on the dataset's val and test splits like the first one, logged in
a run of its own (`teacher-refit`), registered as `<registry.name>-teacher`, and becomes the new
version's teacher in its lineage (`kd_ops.teacher_model_uri`), so the next re-distillation starts
from it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.errors import ConfigError

log = logging.getLogger(__name__)
TAG_REFIT_FROM = "kd_ops.redistill.refit_from"  # on a refitted teacher: the teacher it replaces
TAG_REFIT_ROWS = "kd_ops.redistill.refit_rows"


def teacher_registry_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.registry.name}-teacher"


def check_refit(cfg: ExperimentConfig) -> None:
    """`ConfigError` when the config cannot refit its teacher: a teacher given only by URI has no
    recipe to fit again."""
    sections = [("teacher", cfg.teacher), *((f"teachers.{i}", t) for i, t in enumerate(cfg.teachers))]
    for key, section in sections:
        if section.uri:
            raise ConfigError(
                f"redistill.teacher = 'refit' needs a recipe to fit: {key}.uri = {section.uri!r} is a model, not"
                f" a recipe (set {key}.model and {key}.params, or redistill.teacher: keep)"
            )


def refit_teachers(
    cfg: ExperimentConfig,
    dm: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    previous_uri: str,
    tags: dict[str, str],
) -> tuple[list[Any], str]:
    """The config's teacher(s) fitted on the training split plus the labelled rows (`x`, `y`),
    each logged and registered; returns the models and the lineage URI (comma-separated for an
    ensemble, in the config's order)."""
    import mlflow

    from kd_ops.data.datamodule import ExtraRows
    from kd_ops.pipeline.distillation import _train_teacher, evaluate
    from kd_ops.registry import tracking

    check_refit(cfg)
    refit_dm = dm.with_training_rows(ExtraRows(np.asarray(x, np.float32), np.asarray(y, np.int64)))
    experiment_id = tracking.use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    registered = teacher_registry_name(cfg)
    example = dm.arrays("val")[0][:5]
    models, uris = [], []
    for i, section in enumerate([cfg.teacher, *cfg.teachers]):
        t0 = time.perf_counter()
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"teacher-refit-{i}" if cfg.teachers else "teacher-refit",
            tags={
                tracking.TAG_ROLE: "teacher-refit",
                TAG_REFIT_FROM: previous_uri.split(",")[i],
                TAG_REFIT_ROWS: str(len(y)),
                **tags,
            },
        ) as run:
            mlflow.log_params({"refit.training_rows": len(dm.splits.train), "refit.recent_rows": len(y)})
            model, uri = _train_teacher(cfg, section, refit_dm, cfg.seed + 100 * i, example)
            mlflow.log_metrics({f"{k}": v for k, v in evaluate(cfg, model, dm).metrics.items()})
            version = mlflow.register_model(uri, registered, tags={TAG_REFIT_FROM: previous_uri, **tags}).version
        uris.append(f"models:/{registered}/{version}")
        models.append(model)
        log.info(
            "refitted teacher %s v%s on %d training + %d labelled recent rows in %.1f s (run %s)",
            registered,
            version,
            len(dm.splits.train),
            len(y),
            time.perf_counter() - t0,
            run.info.run_id,
        )
    return models, ",".join(uris)
