"""Probabilistic knowledge transfer, PKT (Passalis & Tefas, 2018).

PKT matches, for each sample, the distribution "which other samples in the batch look like
me" between teacher and student. Like RKD it compares relations, not coordinates, so the
two embeddings may have different widths; unlike RKD's raw distances, the relations are
turned into conditional probabilities, which makes the loss a proper divergence and puts
most weight on each sample's nearest neighbours.
"""

from __future__ import annotations

import torch

from kd_ops.distill.losses.base import PairLoss, Step, register_loss
from kd_ops.distill.losses.rkd import EmbeddingParams


def _conditional_probabilities(emb: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, B) row-stochastic matrix P[i, j] = k(i, j) / sum_m k(i, m), k = (cos + 1) / 2.

    The cosine kernel is shifted into [0, 1] so that every similarity is a non-negative
    weight (the paper's cosine-similarity kernel). The diagonal (self-similarity, k = 1 for
    a non-zero row) is kept in the row sum, as in the authors' released code.
    """
    unit = emb / (emb.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean_i sum_j Q[i, j] · log((Q[i, j] + eps) / (P[i, j] + eps)), Q teacher, P student.

    Exact convention: rows are L2-normalised as e / (|e| + eps); the kernel is (cos + 1) / 2
    including the diagonal j = i; each row is normalised to sum to one (P[i, :] is the
    distribution over neighbours j of sample i); the loss is KL(teacher || student) per row,
    with eps added inside the log on both sides, *summed* over j and *averaged* over rows i.
    The authors' code averages over all B² entries instead, so its value is this one / B;
    summing over j makes the value a true per-sample KL, independent of batch size in scale.

    Embeddings are (B, ...) and are flattened to (B, D); student and teacher D may differ.
    The teacher is detached; student == teacher gives exactly 0.
    """
    s, t = student_emb.flatten(1), teacher_emb.flatten(1)
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"PKT needs the same batch size: student {tuple(student_emb.shape)} vs teacher {tuple(teacher_emb.shape)}"
        )
    p_student = _conditional_probabilities(s, eps)
    with torch.no_grad():
        q_teacher = _conditional_probabilities(t.detach(), eps)
    return (q_teacher * torch.log((q_teacher + eps) / (p_student + eps))).sum(dim=1).mean()


# -- registration -----------------------------------------------------------------------------


@register_loss("pkt")
class PKT(PairLoss):
    with_kd = True
    method_weight = 1.0
    Params = EmbeddingParams

    def forward(self, step: Step) -> torch.Tensor:
        return pkt_loss(step.student(self.params.student), step.teacher(self.params.teacher))
