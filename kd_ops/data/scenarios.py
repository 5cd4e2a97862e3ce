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

and for a table with a text column (`kd_ops.data.text`):

  typos        character noise in every text (dropped, doubled, swapped, replaced letters)
  new_words    a third of the words replaced by words the training vocabulary never held
  plots        half the rows replaced by plot summaries: another domain, with no true label (-1)

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


# -- text: the rows' texts changed and encoded again with the table's own tokenizer ----------------

PLOT_SHARE = 0.5  # the `plots` scenario: half the traffic is plot summaries, not reviews
NO_LABEL = -1  # a row of traffic with no true label (a plot summary is neither fresh nor rotten)


def _text_columns(dm: DistillDataModule, scenario: str) -> list[str]:
    schema = dm.schema
    names = [c.name for c in schema.columns if c.kind == "text"] if schema is not None else []
    if not names:
        raise ValueError(f"scenario {scenario!r} changes texts: the data needs a text column (data.text)")
    return names


def _rewriting(scenario: str, change: Callable[[list[str], np.random.Generator], list[str]]):
    def run(dm: DistillDataModule, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Traffic:
        names = _text_columns(dm, scenario)
        frame = dm.schema.decode(x)
        for name in names:
            frame[name] = change(frame[name].tolist(), rng)
        return dm.schema.encode(frame, where=f"scenario {scenario!r}"), y

    run.__doc__ = change.__doc__
    return run


def _register_text_scenarios() -> None:
    from kd_ops.data.text import new_words, typos

    SCENARIOS.register("typos")(_rewriting("typos", typos))
    SCENARIOS.register("new_words")(_rewriting("new_words", new_words))


_register_text_scenarios()


@SCENARIOS.register("plots")
def _plots(dm: DistillDataModule, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Traffic:
    """A domain shift: half the rows become plot summaries (Rotten Tomatoes' own, or for another
    text table the same texts), which carry no true label (`NO_LABEL`)."""
    from kd_ops.data.text import rotten_tomatoes_plots

    name = _text_columns(dm, "plots")[0]
    plots = rotten_tomatoes_plots()["text"].tolist()
    frame = dm.schema.decode(x)
    swap = rng.random(len(frame)) < PLOT_SHARE
    frame.loc[swap, name] = [plots[i] for i in rng.integers(len(plots), size=int(swap.sum()))]
    return dm.schema.encode(frame, where="scenario 'plots'"), np.where(swap, NO_LABEL, y)


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
