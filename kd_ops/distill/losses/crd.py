"""Contrastive representation distillation, CRD (Tian, Krishnan & Isola, 2020).

CRD asks the student's embedding of a sample to be closer to the teacher's embedding of
*the same* sample than to the teacher's embeddings of many other samples (and symmetrically).
This transfers the teacher's representation as a whole (correlations across dimensions)
instead of matching outputs one coordinate at a time. Many negatives are needed for a good
contrast, far more than a batch holds, so embeddings of past batches are kept in a memory
bank indexed by dataset position and refreshed with momentum.

Variant implemented: the softmax / InfoNCE form, not the paper's NCE form.
  For each sample b with student embedding s_b, teacher embedding t_b (both projected by
  learned linear heads and L2-normalised), and K negative dataset indices n_1..n_K:
    L_student_anchor = CE([s_b·t_b, s_b·M_t[n_1], ..., s_b·M_t[n_K]] / tau, target 0)
    L_teacher_anchor = CE([t_b·s_b, t_b·M_s[n_1], ..., t_b·M_s[n_K]] / tau, target 0)
    loss = mean over b of (L_student_anchor + L_teacher_anchor) / 2
  Why: the paper's NCE loss needs the partition function Z, which the reference code
  estimates once from the first batch and then freezes, plus a noise-distribution constant;
  InfoNCE is an exactly normalised (K+1)-way classification, has no such estimate, and
  gives the same kind of mutual-information bound (I >= log(K+1) - loss). The positive is
  the *current* pair (s_b, t_b), as in MoCo; the bank only supplies negatives. (The reference
  code takes the positive from the bank as well; with the current pair the positive is never
  stale and the teacher head gets a gradient through it from the first step.)

What the caller must provide: `index`, the (B,) positions of the batch's samples in the
training set (the dataset must return them), with 0 <= index < n_data. The heads
`embed_student` and `embed_teacher` are trainable and must be handed to the optimiser;
only the teacher *input* is detached.
"""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kd_ops.distill.losses.base import PairLoss, Step, register_loss
from kd_ops.distill.losses.rkd import EmbeddingParams


class CRDLoss(nn.Module):
    """InfoNCE contrastive distillation against momentum memory banks of past embeddings.

    `n_negatives` is clipped to n_data - 1 (there are only that many other samples).
    Negatives are drawn uniformly *with replacement* from the rows other than the sample's
    own (never the positive; the same negative may occur twice for one sample, which is
    harmless and matches the reference implementation's sampler). The memory banks are
    buffers, so they move with `.to()` and are saved in the state dict.

    Memory update: in training mode only (like BatchNorm statistics: evaluating on held-out
    data must not write to the bank, whose rows are training-set positions), after the loss
    is computed and under no_grad, rows at `index` become normalise(momentum · old +
    (1 - momentum) · new). The loss graph only holds copies of the gathered rows, so the
    in-place update cannot invalidate the current step's backward. If `index` repeats a
    position within one batch, which of the duplicates is written is unspecified.
    """

    memory_student: torch.Tensor
    memory_teacher: torch.Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        n_negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__()
        if n_data < 2:
            raise ValueError(f"CRD needs at least 2 training samples for negatives, got n_data={n_data}")
        if n_negatives < 1:
            raise ValueError(f"CRD needs at least one negative, got n_negatives={n_negatives}")
        if temperature <= 0:
            raise ValueError(f"CRD temperature must be positive, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"CRD momentum must be in [0, 1], got {momentum}")
        self.n_data = int(n_data)
        self.feat_dim = int(feat_dim)
        self.n_negatives = min(int(n_negatives), self.n_data - 1)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.embed_student = nn.Linear(student_dim, feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, feat_dim)
        # random unit vectors: until a row is first written, it acts as an uninformative negative
        self.register_buffer("memory_student", F.normalize(torch.randn(n_data, feat_dim), dim=1))
        self.register_buffer("memory_teacher", F.normalize(torch.randn(n_data, feat_dim), dim=1))

    def sample_negatives(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n_negatives) indices drawn uniformly from {0..n_data-1} minus index[b], per row.

        Draw from n_data - 1 values and shift those at or above the positive up by one: a
        bijection onto the allowed set, so it is uniform and never hits the positive, with
        no rejection loop.
        """
        index = index.to(self.memory_student.device)
        draw = torch.randint(
            0,
            self.n_data - 1,
            (index.shape[0], self.n_negatives),
            device=index.device,
            generator=generator,
        )
        return draw + (draw >= index.unsqueeze(1)).long()

    def embed(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised projections (B, feat_dim) of the flattened student and (detached) teacher embeddings."""
        v_student = F.normalize(self.embed_student(student_emb.flatten(1)), dim=1)
        v_teacher = F.normalize(self.embed_teacher(teacher_emb.detach().flatten(1)), dim=1)
        return v_student, v_teacher

    def forward(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        index: torch.Tensor,
        negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss for a batch; `negatives` (B, K) overrides the sampler (for tests/reproducibility)."""
        batch = student_emb.shape[0]
        if teacher_emb.shape[0] != batch or index.shape != (batch,):
            raise ValueError(
                f"CRD needs one index per sample: student {tuple(student_emb.shape)}, "
                f"teacher {tuple(teacher_emb.shape)}, index {tuple(index.shape)}"
            )
        index = index.to(self.memory_student.device).long()
        if index.numel() and (index.min() < 0 or index.max() >= self.n_data):
            raise ValueError(f"CRD index must lie in [0, {self.n_data}), got {index.tolist()}")
        if negatives is None:
            negatives = self.sample_negatives(index)
        else:
            negatives = negatives.to(index.device).long()
            if negatives.dim() != 2 or negatives.shape[0] != batch:
                raise ValueError(f"CRD negatives must be (batch, K), got {tuple(negatives.shape)}")
            if negatives.numel() and (negatives.min() < 0 or negatives.max() >= self.n_data):
                raise ValueError(f"CRD negatives must lie in [0, {self.n_data})")

        v_student, v_teacher = self.embed(student_emb, teacher_emb)
        positive = (v_student * v_teacher).sum(dim=1, keepdim=True)
        # advanced indexing copies the rows, so the later in-place memory update is safe
        neg_teacher = self.memory_teacher[negatives]  # (B, K, feat_dim)
        neg_student = self.memory_student[negatives]
        logits_student = torch.cat([positive, torch.einsum("bf,bkf->bk", v_student, neg_teacher)], dim=1)
        logits_teacher = torch.cat([positive, torch.einsum("bf,bkf->bk", v_teacher, neg_student)], dim=1)
        target = torch.zeros(batch, dtype=torch.long, device=logits_student.device)
        loss = 0.5 * (
            F.cross_entropy(logits_student / self.temperature, target)
            + F.cross_entropy(logits_teacher / self.temperature, target)
        )

        if self.training:
            self._update_memory(index, v_student, v_teacher)
        return loss

    @torch.no_grad()
    def _update_memory(self, index: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor) -> None:
        for memory, new in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
            mixed = self.momentum * memory[index] + (1.0 - self.momentum) * new.detach().to(memory.dtype)
            memory.index_copy_(0, index, F.normalize(mixed, dim=1))

    def extra_repr(self) -> str:
        return (
            f"n_data={self.n_data}, feat_dim={self.feat_dim}, n_negatives={self.n_negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}"
        )


# -- registration -----------------------------------------------------------------------------


@register_loss("crd")
class CRD(PairLoss):
    with_kd = True
    method_weight = 0.8
    needs_index = True

    class Params(EmbeddingParams):
        feat_dim: int = Field(128, ge=1)
        n_negatives: int = Field(4096, ge=1)
        nce_temperature: float = Field(0.07, gt=0)
        momentum: float = Field(0.5, ge=0, lt=1)

    def prepare(self, student_shapes, teacher_shapes, n_data) -> None:
        p = self.params
        self.crd = CRDLoss(
            prod(student_shapes[p.student]),
            prod(teacher_shapes[p.teacher]),
            n_data,
            feat_dim=p.feat_dim,
            n_negatives=p.n_negatives,
            temperature=p.nce_temperature,
            momentum=p.momentum,
        )

    def forward(self, step: Step) -> torch.Tensor:
        s = step.student(self.params.student).flatten(1)
        t = step.teacher(self.params.teacher).flatten(1)
        return self.crd(s, t, step.index)
