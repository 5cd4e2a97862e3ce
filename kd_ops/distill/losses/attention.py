"""Attention transfer, AT (Zagoruyko & Komodakis, 2017).

An activation-based attention map says *where* a network looks: the per-position energy of
a feature map, summed over channels. Matching these maps transfers spatial focus without
requiring the student to have the teacher's channel count, because the channel axis is
reduced away. The maps are L2-normalised per sample so that only the distribution of
attention matters, not the activations' overall scale (which differs between networks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from kd_ops.distill.losses.base import DistillLoss, Step, register_loss
from kd_ops.models.zoo import Params


def attention_map(feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """(B, C, *spatial) -> (B, prod(spatial)): mean over channels of |f|^p, flattened, L2-normalised.

    The paper's sum over channels and this mean differ by the constant C, which the L2
    normalisation removes. p = 2 is the paper's default; higher p emphasises the most active
    positions. A map that is zero everywhere stays zero (no division by zero).
    """
    if feat.dim() < 3:
        raise ValueError(f"attention maps need (batch, channels, *spatial) features, got {tuple(feat.shape)}")
    energy = feat.abs().pow(p).mean(dim=1)
    return F.normalize(energy.flatten(1), p=2, dim=1)


def attention_loss(
    student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], p: float = 2
) -> torch.Tensor:
    """Mean over feature pairs of mean((a_student - a_teacher)²) over batch and positions.

    Pairs are matched by position in the two lists. Channel counts may differ; spatial sizes
    must match exactly: a mismatch raises ValueError rather than interpolating, because
    silently resizing would hide a wrongly chosen pair of layers. (The paper writes the term
    as beta/2 · || a_s - a_t ||_p summed over pairs; here the squared difference is averaged,
    as in the authors' code, and the weight is left to the caller.) The teacher is detached.
    """
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"attention transfer needs the same, non-zero number of feature maps: "
            f"student {len(student_feats)} vs teacher {len(teacher_feats)}"
        )
    terms = []
    for s, t in zip(student_feats, teacher_feats):
        if s.dim() < 3 or t.dim() < 3 or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                "attention transfer needs the same spatial size: "
                f"student {tuple(s.shape[1:])} vs teacher {tuple(t.shape[1:])}"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"attention transfer needs the same batch size: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
            )
        with torch.no_grad():
            a_teacher = attention_map(t.detach(), p)
        terms.append((attention_map(s, p) - a_teacher).pow(2).mean())
    return torch.stack(terms).mean()


# -- registration -----------------------------------------------------------------------------


@register_loss("attention")
class Attention(DistillLoss):
    """Attention transfer over (student path, teacher path) pairs of conv feature maps."""
    with_kd = True
    method_weight = 1.0

    class Params(Params):
        pairs: list[tuple[str, str]] = Field(min_length=1, description="[[student_path, teacher_path], ...]")
        p: float = Field(2.0, gt=0)

    @property
    def student_paths(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.params.pairs)

    @property
    def teacher_paths(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.params.pairs)

    def prepare(self, student_shapes, teacher_shapes, n_data) -> None:
        for s, t in self.params.pairs:
            ss, ts = student_shapes[s], teacher_shapes[t]
            if len(ss) < 2 or len(ts) < 2 or ss[1:] != ts[1:]:
                raise ValueError(
                    f"attention transfer from student {s!r} {ss} to teacher {t!r} {ts}: "
                    "needs conv feature maps (C, H, W) with the same H and W"
                )

    def forward(self, step: Step) -> torch.Tensor:
        return attention_loss(
            [step.student(s) for s, _ in self.params.pairs],
            [step.teacher(t) for _, t in self.params.pairs],
            self.params.p,
        )
