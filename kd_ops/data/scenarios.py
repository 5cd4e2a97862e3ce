"""Production traffic to replay: clean, or drifted the ways a deployed digit reader drifts.

A scenario draws `n` rows (with their true labels, which a replay may send as late feedback)
from a split and changes them:

  clean        rows as they are, classes as in the split
  noise, shift, contrast
               every row corrupted (`kd_ops.data.CORRUPTIONS`): sensor noise, a mis-centred crop,
               a washed-out scan
  prior_shift  rows untouched, but a few classes make up most of the traffic (a new customer)
  slice_noise  sensor noise on the rows of one slice only (ink "low": thin strokes), the decay an
               average hides

Scenarios are seeded: the same (scenario, seed, window) always gives the same rows, so monitors
and students are compared on the very same traffic.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from kd_ops.core.registry import Registry
from kd_ops.data.corruptions import CORRUPTIONS
from kd_ops.data.datamodule import DistillDataModule

Traffic = tuple[np.ndarray, np.ndarray]  # (rows float32, true labels)
SCENARIOS: Registry[Callable[[DistillDataModule, np.ndarray, np.ndarray, np.random.Generator], Traffic]] = Registry(
    "scenario"
)


def _draw(y: np.ndarray, n: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    p = None if weights is None else weights / weights.sum()
    return rng.choice(len(y), size=n, replace=True, p=p)


@SCENARIOS.register("clean")
def _clean(dm: DistillDataModule, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Traffic:
    return x, y


def _corrupting(kind: str):
    def scenario(dm: DistillDataModule, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Traffic:
        return CORRUPTIONS.get(kind)(x, dm.raw, rng).astype(np.float32), y

    scenario.__doc__ = f"every row: {kind}"
    return scenario


for _kind in CORRUPTIONS.names():
    SCENARIOS.register(_kind)(_corrupting(_kind))


@SCENARIOS.register("slice_noise")
def _slice_noise(dm: DistillDataModule, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Traffic:
    low = dm.input_slices().compute(x)["ink"] == "low"
    out = x.copy()
    out[low] = CORRUPTIONS.get("noise")(x[low], dm.raw, rng)
    return out.astype(np.float32), y


PRIOR_SHIFT_CLASSES, PRIOR_SHIFT_SHARE = 3, 0.7  # three classes (chosen by the seed) take 70% of traffic


@SCENARIOS.register("prior_shift")
def _prior_shift(dm: DistillDataModule, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Traffic:
    return x, y  # the change is in which rows are drawn (see `sample`)


def sample(dm: DistillDataModule, scenario: str, n: int, seed: int = 0, split: str = "test") -> Traffic:
    """`n` rows of `split` under `scenario` (drawn with replacement), and their true labels."""
    fn = SCENARIOS.get(scenario)
    rng = np.random.default_rng(seed)
    x_all, y_all = dm.arrays(split)
    weights = None
    if scenario == "prior_shift":
        favoured = rng.choice(dm.n_classes, size=PRIOR_SHIFT_CLASSES, replace=False)
        per_class = np.bincount(y_all, minlength=dm.n_classes).astype(float)
        share = np.where(
            np.isin(np.arange(dm.n_classes), favoured),
            PRIOR_SHIFT_SHARE / PRIOR_SHIFT_CLASSES,
            (1 - PRIOR_SHIFT_SHARE) / (dm.n_classes - PRIOR_SHIFT_CLASSES),
        )
        weights = share[y_all] / per_class[y_all]  # each row's chance so that classes get `share`
    idx = _draw(y_all, n, rng, weights)
    return fn(dm, np.asarray(x_all[idx], dtype=np.float32), y_all[idx], rng)


def windows(
    dm: DistillDataModule, scenario: str, n_windows: int, rows: int, seed: int = 0, split: str = "test"
) -> Iterator[Traffic]:
    """Successive windows of `rows` rows each; window k is seeded by (seed, k)."""
    for k in range(n_windows):
        yield sample(dm, scenario, rows, seed=seed * 100_003 + k, split=split)
