"""Slices that are a function of the inputs alone.

Evaluation, the served model and the monitors must cut traffic the same way, or a slice that
decays in production cannot be compared with the same slice at distillation time. So the cut
points are learnt once from the training split, stored with the student (`slices.json` in its
run) and applied by the server to every row it answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SLICES_ARTIFACT = "slices.json"
INK_LEVELS = ("low", "mid", "high")


@dataclass(frozen=True)
class InputSlices:
    """Ink-intensity terciles: mean pixel value cut at the training split's 1/3 and 2/3 quantiles."""

    ink_edges: tuple[float, float]

    @classmethod
    def fit(cls, x: np.ndarray) -> "InputSlices":
        lo, hi = np.quantile(np.asarray(x).mean(axis=1), [1 / 3, 2 / 3])
        return cls((float(lo), float(hi)))

    def compute(self, x: np.ndarray) -> dict[str, np.ndarray]:
        ink = np.digitize(np.asarray(x).mean(axis=1), self.ink_edges)
        return {"ink": np.asarray(INK_LEVELS)[ink]}

    @property
    def names(self) -> tuple[str, ...]:
        return ("ink",)

    def to_dict(self) -> dict[str, Any]:
        return {"ink": {"edges": list(self.ink_edges), "levels": list(INK_LEVELS), "of": "mean of the row"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "InputSlices":
        lo, hi = raw["ink"]["edges"]
        return cls((float(lo), float(hi)))
