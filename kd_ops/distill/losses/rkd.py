"""Relational knowledge distillation, RKD (Park, Kim, Lu & Cho, 2019).

Instead of matching each sample's output, RKD matches the *structure* of the batch: the
distances between pairs of embeddings and the angles formed by triplets. Relations are
invariant to the embedding's dimension (student and teacher widths may differ), and after
the normalisation below also to its scale, so the student is free to use its own geometry
as long as it keeps the teacher's shape.

Convention (differs from the authors' code only in the denominator): the Huber loss is
averaged over *distinct* pairs (i != j) and *distinct* triplets (i, j, k pairwise
different). The reference code averages over all B² pairs / B³ triplets, where the
degenerate entries are identically 0 for both networks and only dilute the mean; its value
is ours times (B-1)/B for distance and (B-1)(B-2)/B² for angle. The paper weights the terms
with 25 (distance) and 50 (angle); those weights belong to the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kd_ops.distill.losses.base import LOGITS, PairLoss, Step, register_loss
from kd_ops.models.zoo import Params

_EPS = 1e-12


def _flatten_pair(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, min_batch: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = student_emb.flatten(1), teacher_emb.flatten(1)
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"RKD {what} needs the same batch size: student {tuple(student_emb.shape)} "
            f"vs teacher {tuple(teacher_emb.shape)}"
        )
    if s.shape[0] < min_batch:
        raise ValueError(f"RKD {what} needs at least {min_batch} samples per batch, got {s.shape[0]}")
    return s, t


def _normalised_distances(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the B(B-1) ordered pairs i != j, divided by their mean.

    Dividing by the mean makes the loss scale-free: a student whose embedding is the teacher's
    times a constant already has zero loss. Squared distances come from |a|² + |b|² - 2a·b
    (O(B²) memory rather than O(B²D)); the clamp guards both the tiny negative values that
    cancellation can produce and the infinite gradient of sqrt at 0 for coincident points.
    """
    batch = emb.shape[0]
    sq_norm = emb.pow(2).sum(dim=1)
    sq_dist = sq_norm[:, None] + sq_norm[None, :] - 2.0 * emb @ emb.T
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=emb.device)
    dist = sq_dist[off_diagonal].clamp_min(_EPS).sqrt()
    return dist / dist.mean().clamp_min(_EPS)


def _triplet_cosines(emb: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex j between e_i - e_j and e_k - e_j, for distinct i, j, k.

    Uses O(B²D) memory for the difference vectors and O(B³) for the cosines, as in the paper.
    """
    batch = emb.shape[0]
    unit = F.normalize(emb.unsqueeze(0) - emb.unsqueeze(1), p=2, dim=2)  # unit[j, i] ~ e_i - e_j
    cos = torch.bmm(unit, unit.transpose(1, 2))  # cos[j, i, k]
    eye = torch.eye(batch, dtype=torch.bool, device=emb.device)
    distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
    return cos[distinct]


def _relation_loss(student_emb, teacher_emb, relation, min_batch: int, what: str) -> torch.Tensor:
    """Smooth-L1 between the student's and the (detached) teacher's `relation` of their embeddings."""
    s, t = _flatten_pair(student_emb, teacher_emb, min_batch, what)
    with torch.no_grad():
        target = relation(t.detach())
    return F.smooth_l1_loss(relation(s), target, reduction="mean")


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (Huber, beta=1) between mean-normalised pairwise distances, mean over i != j.

    Embeddings are (B, ...) and are flattened to (B, D); student and teacher D may differ.
    Needs B >= 2. The teacher is detached.
    """
    return _relation_loss(student_emb, teacher_emb, _normalised_distances, 2, "distance")


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (Huber, beta=1) between triplet angle cosines, mean over distinct triplets.

    Embeddings are (B, ...) and are flattened to (B, D); student and teacher D may differ.
    Needs B >= 3. The teacher is detached.
    """
    return _relation_loss(student_emb, teacher_emb, _triplet_cosines, 3, "angle")


# -- registration -----------------------------------------------------------------------------


class EmbeddingParams(Params):
    student: str = Field(LOGITS, description="student module path whose output is the embedding")
    teacher: str = Field(LOGITS, description="teacher module path whose output is the embedding")


@register_loss("rkd")
class RKD(PairLoss):
    with_kd = True
    method_weight = 1.0
    class Params(EmbeddingParams):
        distance_weight: float = Field(1.0, ge=0)
        angle_weight: float = Field(2.0, ge=0)

    def forward(self, step: Step) -> torch.Tensor:
        s, t = step.student(self.params.student), step.teacher(self.params.teacher)
        loss = s.new_zeros(())
        if self.params.distance_weight:
            loss = loss + self.params.distance_weight * rkd_distance_loss(s, t)
        if self.params.angle_weight and s.shape[0] >= 3:
            loss = loss + self.params.angle_weight * rkd_angle_loss(s, t)
        return loss
