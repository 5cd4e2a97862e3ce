"""Corruptions a deployed model meets that a clean test split does not show: noise, shift, contrast."""

from __future__ import annotations

import numpy as np
import torch

from kd_ops.core.registry import Registry
from kd_ops.data.datasets import RawDataset

# -- corruptions ------------------------------------------------------------------------------
# What a deployed digit reader meets that a clean test split does not show: sensor noise, a
# mis-centred crop, a washed-out scan. Each maps raw rows to raw rows of the same range, with a
# fixed seed, so every model is scored on the very same corrupted images.

CORRUPTIONS: Registry = Registry("corruption")


@CORRUPTIONS.register("noise")
def _noise(x: np.ndarray, ds: RawDataset, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise, std 15% of the pixel range."""
    return np.clip(x + rng.normal(0, 0.15 * ds.max_value, x.shape), 0, ds.max_value)


@CORRUPTIONS.register("shift")
def _shift(x: np.ndarray, ds: RawDataset, rng: np.random.Generator) -> np.ndarray:
    """The image moved down and right by an eighth of its size (at least a pixel), zero-filled."""
    c, h, w = ds.input_shape
    d = max(1, round(h / 8))
    img = x.reshape(len(x), c, h, w)
    out = np.zeros_like(img)
    out[:, :, d:, d:] = img[:, :, : h - d, : w - d]
    return out.reshape(len(x), -1)


@CORRUPTIONS.register("contrast")
def _contrast(x: np.ndarray, ds: RawDataset, rng: np.random.Generator) -> np.ndarray:
    """Contrast halved around each image's mean: a faint scan."""
    mean = x.mean(axis=1, keepdims=True)
    return mean + 0.5 * (x - mean)


class corrupt_some:  # noqa: N801 - used like a function: corrupt_some(kinds, share, ds)(batch)
    """A batch augmentation: `share` of the rows of each batch get one of the corruptions `kinds`,
    drawn per row. Trains a teacher that still reads the traffic a deployed student will meet
    (the premise of re-distillation: the teacher labels drifted inputs the student misreads).
    A class, not a closure, so that DDP's spawned processes can receive it."""

    def __init__(self, kinds: list[str], share: float, ds: RawDataset, seed: int = 0):
        self.kinds, self.share, self.ds = list(kinds), share, ds
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fns = [CORRUPTIONS.get(k) for k in self.kinds]
        rows = x.detach().cpu().numpy().copy()
        pick = self.rng.random(len(rows)) < self.share
        which = self.rng.integers(0, len(fns), len(rows))
        for i, fn in enumerate(fns):
            sel = pick & (which == i)
            if sel.any():
                rows[sel] = fn(rows[sel], self.ds, self.rng)
        return torch.as_tensor(rows, dtype=x.dtype, device=x.device)
