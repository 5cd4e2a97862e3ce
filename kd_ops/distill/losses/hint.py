"""Hint-based feature distillation, FitNets (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, 2015).

The student's intermediate feature (the "guided" layer) is regressed onto the teacher's
(the "hint"). The two usually differ in width, so a small learned connector maps the
student's feature into the teacher's space; it is trained with the student and thrown away
afterwards. Only connectors that keep the spatial layout are built (1x1 conv, or linear on
flat features): anything else would have to invent a resampling, and a wrong layer choice
is better reported than silently papered over.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_ops.distill.losses.base import PairLoss, Step, register_loss
from kd_ops.models.zoo import Params


def _connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    if len(student_shape) == 3 and len(teacher_shape) == 3 and student_shape[1:] == teacher_shape[1:]:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    raise ValueError(
        f"no hint connector from student {student_shape} to teacher {teacher_shape}: "
        "need conv features (C, H, W) with the same H and W, or flat features (D,) on both sides"
    )


class HintLoss(nn.Module):
    """MSE(connector(student_feat), teacher_feat), with a learned connector.

    Shapes exclude the batch dimension: (C, H, W) on both sides with equal H, W gives a 1x1
    Conv2d(C_s -> C_t) (with bias); (D,) on both sides gives Linear(D_s -> D_t). The
    connector is a submodule, so its parameters must go to the optimiser together with the
    student's. MSE is averaged over every element (batch, channels, positions). The teacher
    feature is detached.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__()
        self.student_shape = tuple(int(d) for d in student_shape)
        self.teacher_shape = tuple(int(d) for d in teacher_shape)
        self.connector = _connector(self.student_shape, self.teacher_shape)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        if tuple(student_feat.shape[1:]) != self.student_shape or tuple(teacher_feat.shape[1:]) != self.teacher_shape:
            raise ValueError(
                f"HintLoss was built for student {self.student_shape} and teacher {self.teacher_shape} "
                f"(batch excluded), got student {tuple(student_feat.shape[1:])} "
                f"and teacher {tuple(teacher_feat.shape[1:])}"
            )
        return F.mse_loss(self.connector(student_feat), teacher_feat.detach())

    def extra_repr(self) -> str:
        return f"student_shape={self.student_shape}, teacher_shape={self.teacher_shape}"


# -- registration -----------------------------------------------------------------------------


@register_loss("hint")
class Hint(PairLoss):
    """FitNets hint: `student` module path regressed onto `teacher` module path."""
    with_kd = True
    method_weight = 1.0

    class Params(Params):
        student: str
        teacher: str

    def prepare(self, student_shapes, teacher_shapes, n_data) -> None:
        s, t = self.params.student, self.params.teacher
        try:
            self.hint = HintLoss(student_shapes[s], teacher_shapes[t])
        except ValueError as exc:
            raise ValueError(f"hint from student {s!r} to teacher {t!r}: {exc}") from None

    def forward(self, step: Step) -> torch.Tensor:
        return self.hint(step.student(self.params.student), step.teacher(self.params.teacher))
