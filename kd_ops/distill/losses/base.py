"""The contract every distillation loss term meets, and the registry that names them.

A term is an `nn.Module` (connectors and embedding heads are trainable and go to the
optimiser with the student). It declares which student and teacher module paths it reads;
the distiller taps those with forward hooks, or reads the teacher's from the output cache, and
hands the term one `Step`. `prepare()` runs once before training with the tapped shapes, so a
term can size its connector, and a path or shape that cannot work fails before the first epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from kd_ops.core.registry import Registry
from kd_ops.models.zoo import Params

LOGITS = "logits"  # a path naming the model's output rather than a module


@dataclass
class Step:
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    target: torch.Tensor  # (B,) class indices, or (B, C) class probabilities after mixup
    index: torch.Tensor  # (B,) row indices in the dataset
    student_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_feats: dict[str, torch.Tensor] = field(default_factory=dict)

    def hard_target(self) -> torch.Tensor:
        return self.target if self.target.ndim == 1 else self.target.argmax(1)

    def student(self, path: str) -> torch.Tensor:
        return self.student_logits if path == LOGITS else self.student_feats[path]

    def teacher(self, path: str) -> torch.Tensor:
        return self.teacher_logits if path == LOGITS else self.teacher_feats[path]


class DistillLoss(nn.Module):
    """One weighted loss term; subclasses set `Params` and implement `forward(step)`."""

    Params: ClassVar[type[Params]] = Params
    needs_teacher: ClassVar[bool] = True
    needs_index: ClassVar[bool] = False  # reads Step.index (memory banks): row order must be stable
    # As `distill.method`: whether plain KD (weight `kd_weight`) trains beside this term, as its
    # paper trained it (CRD, RKD, PKT and FitNets students all keep the KD and label terms: a
    # feature or relation term alone transfers structure but not the teacher's answers), and
    # this term's weight then (`distill.method_weight` overrides it).
    with_kd: ClassVar[bool] = False
    method_weight: ClassVar[float] = 1.0

    def __init__(self, weight: float, params: Params, temperature: float):
        super().__init__()
        self.weight = float(weight)
        self.params = params
        self.temperature = float(getattr(params, "temperature", None) or temperature)

    @property
    def student_paths(self) -> tuple[str, ...]:
        return ()

    @property
    def teacher_paths(self) -> tuple[str, ...]:
        return ()

    def prepare(
        self, student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]], n_data: int
    ) -> None:
        """Build anything that depends on tapped shapes or on the number of training rows."""

    def forward(self, step: Step) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PairLoss(DistillLoss):
    """A term reading one student path and one teacher path, named `student` and `teacher` in its params."""

    @property
    def student_paths(self) -> tuple[str, ...]:
        return (self.params.student,)

    @property
    def teacher_paths(self) -> tuple[str, ...]:
        return (self.params.teacher,)


LOSSES: Registry[type[DistillLoss]] = Registry("loss")


def register_loss(name: str):
    def decorator(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.loss_name = name
        LOSSES.register(name)(cls)
        return cls

    return decorator


def taps_of(terms: list[DistillLoss], side: str) -> list[str]:
    """Module paths (not `logits`) the terms read on one side, in first-seen order."""
    paths: dict[str, None] = {}
    for term in terms:
        for p in term.student_paths if side == "student" else term.teacher_paths:
            if p != LOGITS:
                paths[p] = None
    return list(paths)
