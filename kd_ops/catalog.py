"""Config checks that need the component registries (and so torch).

Kept apart from `kd_ops.config` so that reading a config stays cheap for tools that only need
its values, while `load_config` still reports every wrong name as a config error.
"""

from __future__ import annotations

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.training import ModelSection
from kd_ops.core.errors import ConfigError
from kd_ops.core.plugins import PluginError
from kd_ops.core.registry import UnknownComponentError, param_errors


def check_components(cfg: ExperimentConfig, source: str) -> None:
    from kd_ops.data.corruptions import CORRUPTIONS
    from kd_ops.data.datasets import DATASETS, RawDataset
    from kd_ops.distill.losses import LOSSES
    from kd_ops.distill.strategies import method_names, strategy_class
    from kd_ops.models.estimators import BOOSTED_TEACHERS
    from kd_ops.models.zoo import MODELS

    problems: list[str] = []

    def lookup(registry, key: str, name: str):
        try:
            return registry.get(name)
        except (UnknownComponentError, PluginError) as exc:  # a refused plugin: its reason, under the key
            problems.append(f"{key} = {name!r}: {exc}")
            return None

    from kd_ops.distill.recipes import RECIPES

    raw = None if cfg.data.is_file else lookup(DATASETS, "data.name", cfg.data.name)
    lookup(RECIPES, "distill.recipe", cfg.distill.recipe)
    for i, section in enumerate([cfg.teacher, *cfg.teachers]):
        key = "teacher" if i == 0 else f"teachers.{i - 1}"
        for j, kind in enumerate(section.augment):
            lookup(CORRUPTIONS, f"{key}.augment.{j}", kind)

    method = cfg.distill.method
    try:
        strategy = strategy_class(method)
    except UnknownComponentError:
        strategy = None
        problems.append(f"distill.method = {method!r}: unknown method; known: {', '.join(method_names())}")
    except PluginError as exc:  # a plugin of that name was refused: its reason, not "unknown"
        strategy = None
        problems.append(f"distill.method = {method!r}: {exc}")
    else:
        problems += strategy.problems(cfg)
    for i, spec in enumerate(cfg.distill.losses):
        cls = lookup(LOSSES, f"distill.losses.{i}.name", spec.name)
        if cls is not None:
            problems += param_errors(cls.Params, spec.params, f"distill.losses.{i}.params", f"loss {spec.name!r}")

    sections: list[tuple[str, ModelSection]] = [("teacher", cfg.teacher), ("student", cfg.student)]
    sections += [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)]
    for key, section in sections:
        if getattr(section, "uri", None):
            continue
        if key == "student" and strategy is not None and not strategy.network_student:
            continue  # e.g. a scikit-learn student, described in distill.params
        if key != "student" and section.model in BOOSTED_TEACHERS:
            entry = BOOSTED_TEACHERS.get(section.model)
        else:
            entry = lookup(MODELS, f"{key}.model", section.model)
        if entry is not None:
            problems += param_errors(entry.params, section.params, f"{key}.params", f"model {section.model!r}")

    dataset = raw() if raw is not None else None
    if isinstance(dataset, RawDataset):  # a table's classes are known once it is read
        n_classes = dataset.n_classes
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


def is_table(cfg: ExperimentConfig) -> bool:
    """Whether the config's data is a table: a file, a label column (a DataFrame given through the
    Python API), or a registered dataset that is one."""
    from kd_ops.data.datasets import names_a_table

    return names_a_table(cfg.data)


def with_table_defaults(cfg: ExperimentConfig, table: bool) -> ExperimentConfig:
    """Defaults that suit a table where the config does not say: a LightGBM teacher (the config's
    default teacher is a CNN, for images) and no image corruptions in the evaluation."""
    if not table:
        return cfg
    update = {}
    if "model" not in cfg.teacher.model_fields_set and not cfg.teacher.uri:
        update["teacher"] = cfg.teacher.model_copy(update={"model": "lightgbm"})
        update["teacher"].model_fields_set.add("model")
    if "robustness" not in cfg.evaluation.model_fields_set:
        update["evaluation"] = cfg.evaluation.model_copy(update={"robustness": False})
        update["evaluation"].model_fields_set.add("robustness")
    return cfg.model_copy(update=update) if update else cfg


def gate_problems(gates: dict[str, float]) -> list[str]:
    """Each gate must name a metric an evaluation produces; the message lists the ones it could."""
    from kd_ops.evaluation.metrics import COMMON_METRICS, STUDENT_METRICS, known_metric
    from kd_ops.registry.gates import SPECIAL_GATES

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
