"""Distillation losses, one per file, and the methods that combine them.

`distill.method` names either a loss (`kd`, `dkd`, `hint`, `attention`, `rkd`, `pkt`, `crd`),
trained against a frozen teacher with weight `kd_weight` and params `distill.params`, or a
training strategy (`mutual`, `born_again`, `sklearn`, `none`, see `kd_ops.distill.strategies`).
`distill.losses` adds further weighted terms to any method, e.g. KD plus a hint. Register your
own loss: a `DistillLoss` subclass in its own file with `@LOSSES.register("name")`.
"""

from __future__ import annotations

from kd_ops.config.training import DistillConfig
from kd_ops.distill.losses import attention, crd, dkd, hint, kd, pkt, rkd  # noqa: F401  (registration)
from kd_ops.distill.losses.base import LOGITS, LOSSES, DistillLoss, Step, taps_of
from kd_ops.distill.losses.kd import kd_loss


def build_loss(name: str, weight: float, params: dict, temperature: float) -> DistillLoss:
    cls = LOSSES.get(name)
    return cls(weight, cls.Params.model_validate(params), temperature)


def build_losses(cfg: DistillConfig, own: str | None = None) -> list[DistillLoss]:
    """The weighted loss terms (besides cross-entropy) a student of this config trains with: `own`
    (the method's loss against the teacher, weight `kd_weight`; by default `distill.method` when it
    names a loss; a loss that declares `with_kd` comes with plain KD at `kd_weight` and itself at
    its `method_weight`), then `distill.losses`."""
    terms: list[DistillLoss] = []
    own = own if own is not None else (cfg.method if cfg.method in LOSSES else None)
    if own is not None:
        params = cfg.params if cfg.method == own else {}
        cls = LOSSES.get(own)
        default = cfg.kd_weight
        if cls.with_kd:  # the paper's recipe: KD at kd_weight, this term beside it at its own weight
            if not any(spec.name == "kd" for spec in cfg.losses):  # the user weighs KD: no second one
                terms.append(build_loss("kd", cfg.kd_weight, {}, cfg.temperature))
            default = cls.method_weight
        weight = cfg.method_weight if cfg.method_weight is not None else default
        terms.append(build_loss(own, weight, params, cfg.temperature))
    for spec in cfg.losses:
        terms.append(build_loss(spec.name, spec.weight, spec.params, cfg.temperature))
    return terms


__all__ = [
    "LOGITS",
    "LOSSES",
    "DistillLoss",
    "Step",
    "build_loss",
    "build_losses",
    "kd_loss",
    "taps_of",
]
