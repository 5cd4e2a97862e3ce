"""Hinton knowledge distillation (Hinton, Vinyals & Dean, 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kd_ops.distill.losses.base import DistillLoss, Step, register_loss
from kd_ops.models.zoo import Params


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between temperature-softened distributions, times T².

    The T² factor keeps the gradient of the soft term at the same scale as the hard-label term
    when the temperature changes (the soft gradients shrink as 1/T²), so `kd_weight` and
    `ce_weight` mean the same thing at every temperature. Batch mean over rows.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * (t * t)


# -- registration -----------------------------------------------------------------------------


@register_loss("kd")
class KD(DistillLoss):
    class Params(Params):
        temperature: float | None = Field(None, gt=0, description="defaults to distill.temperature")

    def forward(self, step: Step) -> torch.Tensor:
        return kd_loss(step.student_logits, step.teacher_logits, self.temperature)
