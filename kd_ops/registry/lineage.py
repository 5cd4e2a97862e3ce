"""Lineage tags on every MLflow run started while kd-ops is at work, via MLflow's plugin hook.

MLflow asks each registered `mlflow.run_context_provider` for tags whenever a run starts with
`mlflow.start_run`. kd-ops registers `LineageRunContext`: inside `with lineage(...)` (which the
distillation pipeline and the `distillation` evaluator enter, and which user code may enter
too) every new run, including ones that kd-ops does not start itself such as those of
`mlflow.models.evaluate`, carries the teacher, dataset and config it belongs to. Outside it the
provider adds nothing, so installing kd-ops never tags anybody else's runs.

This module is imported by MLflow at start-up: it must stay free of heavy imports.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from mlflow.tracking.context.abstract_context import RunContextProvider

_CURRENT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("kd_ops_lineage", default=None)
TAG_PLUGIN = "kd_ops.lineage_source"


@contextlib.contextmanager
def lineage(**tags: str) -> Iterator[dict[str, str]]:
    """Runs started inside get these tags (keys without a `kd_ops.` prefix get one); nestable."""
    merged = dict(_CURRENT.get() or {})
    merged.update({(k if k.startswith("kd_ops.") else f"kd_ops.{k}"): str(v) for k, v in tags.items() if v is not None})
    token = _CURRENT.set(merged)
    try:
        yield merged
    finally:
        _CURRENT.reset(token)


def current() -> dict[str, str]:
    return dict(_CURRENT.get() or {})


class LineageRunContext(RunContextProvider):
    """MLflow run-context plugin (entry point group `mlflow.run_context_provider`)."""

    def in_context(self) -> bool:
        return bool(_CURRENT.get())

    def tags(self) -> dict[str, str]:
        from kd_ops.core.version import __version__

        return {**current(), TAG_PLUGIN: "run_context_provider", "kd_ops.version": __version__}
