"""Replayable production traffic: each scenario changes what it claims and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from kd_ops.config.training import DataConfig
from kd_ops.core.registry import UnknownComponentError
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.data.scenarios import PRIOR_SHIFT_CLASSES, PRIOR_SHIFT_SHARE, SCENARIOS, sample, windows


@pytest.fixture(scope="module")
def dm():
    module = DistillDataModule(DataConfig(name="digits"), seed=0)
    module.setup()
    return module


def test_every_scenario_is_registered():
    images = {"clean", "noise", "shift", "contrast", "prior_shift", "slice_noise"}
    assert set(SCENARIOS.names()) == images | {"typos", "new_words", "plots"}  # the last three: text


def test_a_text_scenario_on_images_is_a_clear_error(dm):
    with pytest.raises(ValueError, match="scenario 'typos' changes texts: the data needs a text column"):
        sample(dm, "typos", 10)


def test_clean_draws_rows_of_the_split_with_their_labels(dm):
    x, y = sample(dm, "clean", 500, seed=1)
    x_test, y_test = dm.arrays("test")
    lookup = {row.tobytes(): label for row, label in zip(x_test, y_test)}
    assert all(lookup[row.tobytes()] == label for row, label in zip(x, y))


@pytest.mark.parametrize("kind", ["noise", "shift", "contrast"])
def test_corruptions_change_every_row_and_keep_labels(dm, kind):
    clean_x, clean_y = sample(dm, "clean", 300, seed=2)
    x, y = sample(dm, kind, 300, seed=2)
    np.testing.assert_array_equal(y, clean_y)  # same rows drawn, then corrupted
    changed = (np.abs(x - clean_x).max(axis=1) > 0).mean()
    assert changed > 0.9
    assert x.min() >= 0 and x.max() <= dm.raw.max_value + 1e-6


def test_prior_shift_skews_the_classes_not_the_rows(dm):
    _, y_clean = sample(dm, "clean", 4000, seed=3)
    _, y = sample(dm, "prior_shift", 4000, seed=3)
    top = np.sort(np.bincount(y, minlength=10))[::-1][:PRIOR_SHIFT_CLASSES].sum() / len(y)
    top_clean = np.sort(np.bincount(y_clean, minlength=10))[::-1][:PRIOR_SHIFT_CLASSES].sum() / len(y_clean)
    assert abs(top - PRIOR_SHIFT_SHARE) < 0.04 and top_clean < 0.4


def test_slice_noise_touches_only_its_slice(dm):
    clean_x, _ = sample(dm, "clean", 600, seed=4)
    x, _ = sample(dm, "slice_noise", 600, seed=4)
    low = dm.input_slices().compute(clean_x)["ink"] == "low"
    assert 0.15 < low.mean() < 0.6
    assert (np.abs(x[low] - clean_x[low]).max(axis=1) > 0).all()
    np.testing.assert_array_equal(x[~low], clean_x[~low])


def test_windows_are_seeded_and_distinct(dm):
    first = [w[0] for w in windows(dm, "noise", 3, 50, seed=7)]
    again = [w[0] for w in windows(dm, "noise", 3, 50, seed=7)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])


def test_an_unknown_scenario_lists_the_known_ones(dm):
    with pytest.raises(UnknownComponentError, match="slice_noise"):
        sample(dm, "earthquake", 10)
