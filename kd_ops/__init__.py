"""kd-ops: knowledge distillation as a production loop.

The public API (what the README and docs use). Names load on first use (PEP 562), so
`import kd_ops` and `kd-ops --help` stay fast: torch, Lightning and MLflow are imported only when
a name that needs them is touched.

    from kd_ops import load_config, run_distillation, promote, serve
    cfg = load_config("examples/digits.yaml", ["distill.temperature=2"])
    result = run_distillation(cfg)

Extension points (one file plus a decorator each, see docs/extending.md): `register_loss`,
`register_model`, `register_dataset`, `register_strategy`, `register_sklearn_model`,
`register_boosted_teacher`; tables: `TableSource` (a registered dataset that is a DataFrame),
`TableSchema` (a table model's columns and classes), `TableModel` (a registered table model).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kd_ops.core.version import __version__

# name -> module that defines it
_API: dict[str, str] = {
    # configs
    "ConfigError": "kd_ops.core.errors",
    "ExperimentConfig": "kd_ops.config.experiment",
    "load_config": "kd_ops.config.loading",
    "config_from_dict": "kd_ops.config.loading",
    # distillation and re-distillation
    "run_distillation": "kd_ops.pipeline.distillation",
    "DistillResult": "kd_ops.pipeline.distillation",
    "run_redistillation": "kd_ops.pipeline.redistill",
    # evaluation
    "evaluate_model": "kd_ops.evaluation.evaluate",
    "load_model": "kd_ops.models.loading",
    # the registry
    "promote": "kd_ops.registry.promotion",
    "rollback": "kd_ops.registry.promotion",
    # serving and the prediction log
    "serve": "kd_ops.serving.server",
    "ServeSettings": "kd_ops.serving.state",
    "PredictionLog": "kd_ops.prediction_log.client",
    "read_predictions": "kd_ops.prediction_log.reader",
    # extension points
    "register_loss": "kd_ops.distill.losses.base",
    "DistillLoss": "kd_ops.distill.losses.base",
    "register_model": "kd_ops.models.zoo",
    "Params": "kd_ops.models.zoo",
    "register_sklearn_model": "kd_ops.models.sklearn_students",
    "register_dataset": "kd_ops.data.datasets",
    "RawDataset": "kd_ops.data.datasets",
    "TableSource": "kd_ops.data.datasets",
    "TableSchema": "kd_ops.data.tables",
    "TableModel": "kd_ops.models.table_model",
    "register_boosted_teacher": "kd_ops.models.estimators",
    "register_strategy": "kd_ops.distill.strategies.strategy",
    "Strategy": "kd_ops.distill.strategies.strategy",
}

__all__ = [
    "__version__",
    "ConfigError",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "run_distillation",
    "DistillResult",
    "run_redistillation",
    "evaluate_model",
    "load_model",
    "promote",
    "rollback",
    "serve",
    "ServeSettings",
    "PredictionLog",
    "read_predictions",
    "register_loss",
    "DistillLoss",
    "register_model",
    "Params",
    "register_sklearn_model",
    "register_dataset",
    "RawDataset",
    "TableSource",
    "TableSchema",
    "TableModel",
    "register_boosted_teacher",
    "register_strategy",
    "Strategy",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'kd_ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from kd_ops.config.experiment import ExperimentConfig
    from kd_ops.config.loading import config_from_dict, load_config
    from kd_ops.core.errors import ConfigError
    from kd_ops.data.datasets import RawDataset, TableSource, register_dataset
    from kd_ops.data.tables import TableSchema
    from kd_ops.distill.losses.base import DistillLoss, register_loss
    from kd_ops.distill.strategies.strategy import Strategy, register_strategy
    from kd_ops.evaluation.evaluate import evaluate_model
    from kd_ops.models.estimators import register_boosted_teacher
    from kd_ops.models.loading import load_model
    from kd_ops.models.sklearn_students import register_sklearn_model
    from kd_ops.models.table_model import TableModel
    from kd_ops.models.zoo import Params, register_model
    from kd_ops.pipeline.distillation import DistillResult, run_distillation
    from kd_ops.pipeline.redistill import run_redistillation
    from kd_ops.prediction_log.client import PredictionLog
    from kd_ops.prediction_log.reader import read_predictions
    from kd_ops.registry.promotion import promote, rollback
    from kd_ops.serving.server import serve
    from kd_ops.serving.state import ServeSettings
