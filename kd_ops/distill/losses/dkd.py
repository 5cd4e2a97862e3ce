"""Decoupled knowledge distillation, DKD (Zhao, Cui, Song, Qiu & Liang, 2022).

Hinton's KD loss splits exactly into two parts: TCKD, a binary KL on how much probability
mass sits on the target class versus all other classes, and NCKD, a KL among the non-target
classes only. In the classic loss NCKD is multiplied by (1 - teacher's target probability),
so the more confident the teacher, the less its "dark knowledge" is transferred. DKD
removes that coupling and weights the two parts independently (alpha, beta in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kd_ops.distill.losses.base import DistillLoss, Step, register_loss
from kd_ops.models.zoo import Params


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "DKD needs (batch, classes) logits of the same shape: "
            f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[1] < 2:
        raise ValueError("DKD needs at least two classes (there must be a non-target class)")
    if target.shape != (student_logits.shape[0],) or target.dtype != torch.long:
        raise ValueError(
            f"DKD needs one integer class index per row: target {tuple(target.shape)} {target.dtype} "
            f"for logits {tuple(student_logits.shape)}"
        )


def _non_target(scaled: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """(B, C-1) entries of `scaled` with the target column removed, other columns in order."""
    batch, classes = scaled.shape
    return scaled[~is_target].reshape(batch, classes - 1)


def _binary_log_probs(scaled: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """(B, 2) log of [p(target), p(any non-target)] under softmax(scaled).

    The non-target mass is a logsumexp of log-probabilities rather than log(1 - p_target):
    the latter loses all precision (and gives -inf) when the target probability rounds to 1.
    """
    log_p = F.log_softmax(scaled, dim=1)
    log_target = log_p[is_target]  # one True per row, row-major: shape (B,)
    log_rest = torch.logsumexp(_non_target(log_p, is_target), dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    target_weight: float,
    nontarget_weight: float,
) -> torch.Tensor:
    """T² · (target_weight · TCKD + nontarget_weight · NCKD), each a batch mean of per-row KL.

    - TCKD = KL(b_teacher || b_student) with b = [p_target, 1 - p_target] at temperature T.
    - NCKD = KL(q_teacher || q_student) with q = softmax over the non-target logits / T, i.e.
      the non-target probabilities renormalised to sum to one (the target class is removed,
      not just set to zero, so it contributes nothing and cannot produce 0·log 0 terms).

    Both terms carry T² for the same reason as `kd_loss`: soft-target gradients shrink as
    1/T². `target_weight` and `nontarget_weight` are the paper's alpha and beta (it uses
    alpha=1 and a dataset-dependent beta, e.g. 8 on CIFAR-100). With target_weight=1 and
    nontarget_weight equal, per row, to (1 - teacher's target probability), this is exactly
    `kd_loss`. The teacher is detached; `target` is (B,) int64 class indices.
    """
    _check(student_logits, teacher_logits, target)
    t = float(temperature)
    teacher_logits = teacher_logits.detach()
    is_target = F.one_hot(target, student_logits.shape[1]).bool()
    s, te = student_logits / t, teacher_logits / t

    tckd = F.kl_div(
        _binary_log_probs(s, is_target), _binary_log_probs(te, is_target), log_target=True, reduction="batchmean"
    )
    nckd = F.kl_div(
        F.log_softmax(_non_target(s, is_target), dim=1),
        F.log_softmax(_non_target(te, is_target), dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return (target_weight * tckd + nontarget_weight * nckd) * (t * t)


# -- registration -----------------------------------------------------------------------------


@register_loss("dkd")
class DKD(DistillLoss):
    """Decoupled KD. With mixup the hard target is the dominant label of the blend."""

    class Params(Params):
        target_weight: float = Field(1.0, ge=0, description="TCKD weight (the paper's alpha)")
        nontarget_weight: float = Field(8.0, ge=0, description="NCKD weight (the paper's beta)")
        temperature: float | None = Field(None, gt=0, description="defaults to distill.temperature")

    def forward(self, step: Step) -> torch.Tensor:
        p = self.params
        return dkd_loss(
            step.student_logits,
            step.teacher_logits,
            step.hard_target(),
            self.temperature,
            p.target_weight,
            p.nontarget_weight,
        )
