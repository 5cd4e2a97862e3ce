"""Distillation losses, one per file, and the methods that combine them.

A method turns the `distill` section into a weighted list of loss terms; the
`DistillationModule` adds them up. New methods register here by name, so a config chooses
them without importing code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kd_ops.config import DistillConfig
from kd_ops.losses.kd import kd_loss
from kd_ops.registry import Registry

# (student_logits, teacher_logits) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    name: str
    weight: float
    fn: LossFn
    needs_teacher: bool = True


METHODS: Registry[Callable[[DistillConfig], list[LossTerm]]] = Registry("distillation method")


@METHODS.register("none")
def _labels_only(cfg: DistillConfig) -> list[LossTerm]:
    return []


@METHODS.register("kd")
def _hinton(cfg: DistillConfig) -> list[LossTerm]:
    t = cfg.temperature
    return [LossTerm("kd", cfg.kd_weight, lambda s, te: kd_loss(s, te, t))]


def loss_terms(cfg: DistillConfig) -> list[LossTerm]:
    return METHODS.get(cfg.method)(cfg)


__all__ = ["METHODS", "LossTerm", "kd_loss", "loss_terms"]
