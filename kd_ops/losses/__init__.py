"""Distillation losses, one per file, and the methods that combine them.

`distill.method` names either a loss (`kd`, `dkd`, `hint`, `attention`, `rkd`, `pkt`, `crd`),
trained against a frozen teacher with weight `kd_weight` and params `distill.params`, or a
training strategy (`mutual`, `born_again`, `sklearn`, `none`) that the pipeline runs
differently. `distill.losses` adds further weighted terms to any method, e.g. KD plus a hint.
"""

from __future__ import annotations

from kd_ops.config import DistillConfig
from kd_ops.losses import attention, crd, dkd, hint, kd, pkt, rkd  # noqa: F401  (registration)
from kd_ops.losses.base import LOGITS, LOSSES, DistillLoss, Step, taps_of
from kd_ops.losses.kd import kd_loss

# Strategies: how students are trained, beyond a list of loss terms. Value: the loss term the
# strategy's students use against their teacher (None: labels only, or not a Lightning student).
STRATEGIES: dict[str, str | None] = {"none": None, "mutual": None, "born_again": "kd", "sklearn": None}


def method_names() -> list[str]:
    return sorted({*LOSSES.names(), *STRATEGIES})


def build_loss(name: str, weight: float, params: dict, temperature: float) -> DistillLoss:
    cls = LOSSES.get(name)
    return cls(weight, cls.Params.model_validate(params), temperature)


def build_losses(cfg: DistillConfig) -> list[DistillLoss]:
    """The weighted loss terms (besides cross-entropy) a student of this config trains with."""
    terms: list[DistillLoss] = []
    own = STRATEGIES.get(cfg.method, cfg.method)
    if own is not None:
        params = cfg.params if cfg.method in LOSSES else {}
        terms.append(build_loss(own, cfg.kd_weight, params, cfg.temperature))
    for spec in cfg.losses:
        terms.append(build_loss(spec.name, spec.weight, spec.params, cfg.temperature))
    return terms


__all__ = [
    "LOGITS",
    "LOSSES",
    "STRATEGIES",
    "DistillLoss",
    "Step",
    "build_loss",
    "build_losses",
    "kd_loss",
    "method_names",
    "taps_of",
]
