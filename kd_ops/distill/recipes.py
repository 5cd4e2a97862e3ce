"""Recipes: named presets of the distillation keys, chosen with `distill.recipe`.

A recipe fills in the keys a config leaves unset (keys you set win over it), and may differ for
images and tables, since an image can be blended or boxed and a table's encoded rows cannot. The
resolved values are what the run logs, so a run's params say what was trained, not which preset.

Register your own: a function returning `{section: {key: value}}` for `table` True or False,
decorated with `@register_recipe("name")`.

- `standard`: what the config says (the keys' own defaults): the teacher's outputs are cached
  where inputs do not change, the student trains `student.epochs` / `student.min_steps`.
- `function_matching` (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
  consistent"): the student matches the teacher's whole function rather than its outputs on fixed
  rows. Every step teacher and student see the same fresh augmented view (mixup or CutMix, one
  per batch, for images; swap noise for tables), so the teacher runs each step and the cache is
  bypassed; the loss is the KL to the teacher at temperature 1 with a small weight on the labels
  that exist; and the schedule is long, by step count (patience), because a student keeps
  gaining fidelity long after a labels-only student would have converged.
"""

from __future__ import annotations

from typing import Any, Callable

from kd_ops.core.registry import Registry

RecipeFn = Callable[[bool], dict[str, dict[str, Any]]]
RECIPES: Registry[RecipeFn] = Registry("recipe")


def register_recipe(name: str):
    """`@register_recipe("name")` on `fn(table: bool) -> {section: {key: value}}`."""
    return RECIPES.register(name)


@register_recipe("standard")
def standard(table: bool) -> dict[str, dict[str, Any]]:
    return {}


FUNCTION_MATCHING_STEPS = 6000


@register_recipe("function_matching")
def function_matching(table: bool) -> dict[str, dict[str, Any]]:
    augment = {"swap_noise": 0.2} if table else {"mixup": 1.0, "cutmix": 1.0}
    return {
        "distill": {"temperature": 1.0, "kd_weight": 1.0, "ce_weight": 0.1, **augment},
        "student": {"min_steps": FUNCTION_MATCHING_STEPS},
    }


def with_recipe(cfg: Any, table: bool) -> Any:
    """`cfg` with `distill.recipe`'s presets in every key the config does not set itself (an
    unknown recipe leaves it as it is: `kd_ops.catalog.check_components` names it)."""
    if cfg.distill.recipe not in RECIPES:
        return cfg
    preset = RECIPES.get(cfg.distill.recipe)(table)
    update: dict[str, Any] = {}
    for section, keys in preset.items():
        current = getattr(cfg, section)
        fill = {k: v for k, v in keys.items() if k not in current.model_fields_set}
        if fill:
            new = current.model_copy(update=fill)
            new.model_fields_set.update(fill)
            update[section] = new
    return cfg.model_copy(update=update) if update else cfg
