"""Config checks that need the component registries (and so torch).

Kept apart from `kd_ops.config` so that reading a config stays cheap for tools that only need
its values, while `load_config` still reports every wrong name as a config error.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from kd_ops.config import ConfigError, ExperimentConfig, ModelSection
from kd_ops.registry import UnknownComponentError


def _param_errors(schema: type[BaseModel], params: dict[str, Any], key: str, what: str) -> list[str]:
    try:
        schema.model_validate(params)
    except ValidationError as err:
        out = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            value = e.get("input") if e["type"] != "missing" else "(missing)"
            out.append(f"{key}.{loc} = {value!r}: {msg} ({what})")
        return out
    return []


def check_components(cfg: ExperimentConfig, source: str) -> None:
    from kd_ops.data import CORRUPTIONS, DATASETS
    from kd_ops.losses import LOSSES, STRATEGIES, method_names
    from kd_ops.models import MODELS
    from kd_ops.strategies import STRATEGY_PARAMS

    problems: list[str] = []

    def lookup(registry, key: str, name: str):
        try:
            return registry.get(name)
        except UnknownComponentError as exc:
            problems.append(f"{key} = {name!r}: {exc}")
            return None

    raw = lookup(DATASETS, "data.name", cfg.data.name)
    for i, section in enumerate([cfg.teacher, *cfg.teachers]):
        key = "teacher" if i == 0 else f"teachers.{i - 1}"
        for j, kind in enumerate(section.augment):
            lookup(CORRUPTIONS, f"{key}.augment.{j}", kind)

    method = cfg.distill.method
    if method in STRATEGIES:
        if method in STRATEGY_PARAMS:
            problems += _param_errors(
                STRATEGY_PARAMS[method], cfg.distill.params, "distill.params", f"method {method!r}"
            )
        if method == "sklearn" and not problems:
            from kd_ops.sklearn_student import SKLEARN_MODELS

            p = STRATEGY_PARAMS[method].model_validate(cfg.distill.params)
            entry = lookup(SKLEARN_MODELS, "distill.params.model", p.model)
            if entry is not None:
                problems += _param_errors(entry.params, p.params, "distill.params.params", f"sklearn model {p.model!r}")
    elif method in LOSSES:
        problems += _param_errors(LOSSES.get(method).Params, cfg.distill.params, "distill.params", f"method {method!r}")
    else:
        problems.append(f"distill.method = {method!r}: unknown method; known: {', '.join(method_names())}")
    for i, spec in enumerate(cfg.distill.losses):
        cls = lookup(LOSSES, f"distill.losses.{i}.name", spec.name)
        if cls is not None:
            problems += _param_errors(cls.Params, spec.params, f"distill.losses.{i}.params", f"loss {spec.name!r}")

    sections: list[tuple[str, ModelSection]] = [("teacher", cfg.teacher), ("student", cfg.student)]
    sections += [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)]
    for key, section in sections:
        if getattr(section, "uri", None):
            continue
        if method == "sklearn" and key == "student":
            continue  # the student is a scikit-learn model, described in distill.params
        entry = lookup(MODELS, f"{key}.model", section.model)
        if entry is not None:
            problems += _param_errors(entry.params, section.params, f"{key}.params", f"model {section.model!r}")

    if raw is not None:
        n_classes = raw().n_classes
        bad = [c for c in cfg.data.exclude_classes if not 0 <= c < n_classes]
        if bad:
            problems.append(
                f"data.exclude_classes = {cfg.data.exclude_classes!r}: {bad} not among the classes 0..{n_classes - 1}"
            )
        elif len(set(cfg.data.exclude_classes)) >= n_classes:
            problems.append(f"data.exclude_classes = {cfg.data.exclude_classes!r}: leaves no class in the transfer set")

    problems += gate_problems(cfg.gates)

    if problems:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(problems))


def gate_problems(gates: dict[str, float]) -> list[str]:
    """Each gate must name a metric an evaluation produces; the message lists the ones it could."""
    from kd_ops.evaluation import COMMON_METRICS, STUDENT_METRICS, known_metric
    from kd_ops.gates import SPECIAL_GATES

    out = []
    for key, threshold in gates.items():
        op, metric = key[:3], key[4:]
        if metric in SPECIAL_GATES:
            if op != SPECIAL_GATES[metric]:
                out.append(f"gates.{key} = {threshold!r}: {metric} takes only {SPECIAL_GATES[metric]}_{metric}")
        elif not known_metric(metric):
            known = [*STUDENT_METRICS, *COMMON_METRICS, *SPECIAL_GATES, "test_accuracy_slice_<column>_<value>"]
            out.append(f"gates.{key} = {threshold!r}: unknown metric {metric!r}; known: {', '.join(known)}")
    return out
