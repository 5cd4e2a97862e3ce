"""Config checks that need the component registries (and so torch).

Kept apart from `kd_ops.config` so that reading a config stays cheap for tools that only need
its values, while `load_config` still reports every wrong name as a config error.
"""

from __future__ import annotations

from pydantic import ValidationError

from kd_ops.config import ConfigError, ExperimentConfig
from kd_ops.registry import UnknownComponentError


def check_components(cfg: ExperimentConfig, source: str) -> None:
    from kd_ops.data import DATASETS
    from kd_ops.losses import METHODS
    from kd_ops.models import MODELS

    problems: list[str] = []

    def lookup(registry, key: str, name: str):
        try:
            return registry.get(name)
        except UnknownComponentError as exc:
            problems.append(f"{key} = {name!r}: {exc}")
            return None

    raw = lookup(DATASETS, "data.name", cfg.data.name)
    lookup(METHODS, "distill.method", cfg.distill.method)
    for role in ("teacher", "student"):
        section = getattr(cfg, role)
        if role == "teacher" and section.uri:
            continue
        entry = lookup(MODELS, f"{role}.model", section.model)
        if entry is None:
            continue
        try:
            entry.params.model_validate(section.params)
        except ValidationError as err:
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"])
                msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                problems.append(f"{role}.params.{loc} = {e.get('input')!r}: {msg} (model {section.model!r})")

    if raw is not None:
        n_classes = raw().n_classes
        bad = [c for c in cfg.data.exclude_classes if not 0 <= c < n_classes]
        if bad:
            problems.append(
                f"data.exclude_classes = {cfg.data.exclude_classes!r}: {bad} not among the classes 0..{n_classes - 1}"
            )
        elif len(set(cfg.data.exclude_classes)) >= n_classes:
            problems.append(f"data.exclude_classes = {cfg.data.exclude_classes!r}: leaves no class in the transfer set")

    if problems:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(problems))
