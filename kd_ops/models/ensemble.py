"""Several teachers seen by the student as one.

The members' class probabilities are mixed (average, fixed weights, or per-sample confidence)
and handed on as log-probabilities, which are valid logits: every logit-based loss (KD, DKD,
RKD/PKT/CRD on `logits`) works unchanged with an ensemble, and the cache stores it like any
teacher. Feature taps address a member by path: `members.0.net.features.3`.
"""

from __future__ import annotations

import torch
from torch import nn


class TeacherEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module], combine: str = "average", weights: list[float] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one teacher")
        if combine not in ("average", "weights", "confidence"):
            raise ValueError(f"unknown combine {combine!r}; known: average, weights, confidence")
        self.members = nn.ModuleList(members)
        self.combine = combine
        w = torch.tensor(weights if combine == "weights" else [1.0] * len(members), dtype=torch.float32)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"teacher weights {w.tolist()} do not fit {len(members)} teachers")
        self.register_buffer("weights", w / w.sum())

    def member_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """(members, batch) mixing weights; confidence = each member's max probability, renormalised."""
        if self.combine == "confidence":
            conf = probs.max(dim=2).values
            return conf / conf.sum(dim=0, keepdim=True)
        return self.weights[:, None].to(probs).expand(probs.shape[0], probs.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(dim=1) for m in self.members])  # (M, B, C)
        mixed = (self.member_weights(probs)[..., None] * probs).sum(dim=0)
        return mixed.clamp_min(1e-12).log()
