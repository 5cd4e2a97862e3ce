"""Splits are deterministic per seed, stratified, and the transfer-set options hold."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kd_ops.config.training import DataConfig
from kd_ops.data.datamodule import DistillDataModule


@pytest.mark.parametrize("name,n_features", [("digits", 64), ("mnist5k", 784)])
def test_splits_deterministic_disjoint_and_stratified(name, n_features):
    a = DistillDataModule(DataConfig(name=name), seed=3)
    b = DistillDataModule(DataConfig(name=name), seed=3)
    c = DistillDataModule(DataConfig(name=name), seed=4)
    assert a.n_features == n_features
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a.splits, part), getattr(b.splits, part))
    s = a.splits
    assert not set(s.train) & set(s.test) and not set(s.train) & set(s.val) and not set(s.val) & set(s.test)
    assert len(s.train) + len(s.val) + len(s.test) == len(a.raw.y)
    overall = np.bincount(a.raw.y) / len(a.raw.y)
    in_test = np.bincount(a.raw.y[s.test], minlength=10) / len(s.test)
    assert np.abs(overall - in_test).max() < 0.02


def test_normalization_fitted_on_training_split_only():
    dm = DistillDataModule(DataConfig(name="digits"), seed=0)
    dm.setup()
    mean, std = dm.normalization()
    x_train, _ = dm.arrays("train")
    assert mean == pytest.approx(float(x_train.mean()), rel=1e-5)
    assert std == pytest.approx(float(x_train.std()), rel=1e-4)
    # Changing every non-training row leaves the statistics as they were.
    x = dm.raw.x.copy()
    x[np.concatenate([dm.splits.val, dm.splits.test])] *= 10
    dm.raw = dataclasses.replace(dm.raw, x=x)
    assert dm.normalization() == (mean, std)


def test_transfer_fraction_and_excluded_classes():
    dm = DistillDataModule(DataConfig(name="digits", train_fraction=0.1, exclude_classes=[3]), seed=0)
    dm.setup()
    t = dm.splits.transfer
    assert set(t) <= set(dm.splits.train)
    assert 3 not in set(dm.raw.y[t])
    n_eligible = int((dm.raw.y[dm.splits.train] != 3).sum())
    assert len(t) == round(0.1 * n_eligible)
    assert len(set(dm.raw.y[t])) == 9, "stratified: every kept class is present"
    # the teacher's split and the evaluation splits do not depend on the transfer options
    full = DistillDataModule(DataConfig(name="digits"), seed=0)
    full.setup()
    np.testing.assert_array_equal(full.splits.test, dm.splits.test)
    np.testing.assert_array_equal(full.splits.train, dm.splits.train)


def test_slices_true_class_and_ink_tercile():
    dm = DistillDataModule(DataConfig(name="digits"), seed=0)
    dm.setup()
    sl = dm.slices("test")
    _, y = dm.arrays("test")
    np.testing.assert_array_equal(sl["label"], y.astype(str))
    levels, counts = np.unique(sl["ink"], return_counts=True)
    assert set(levels) == {"low", "mid", "high"}
    assert counts.min() > 0.2 * len(y), "terciles of the training split split the test split roughly evenly"


def test_loaders_yield_rows_with_their_index():
    dm = DistillDataModule(DataConfig(name="digits", batch_size=32), seed=0, role="transfer")
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    np.testing.assert_array_equal(dm.raw.y[idx.numpy()], y.numpy())
    np.testing.assert_allclose(dm.raw.x[idx.numpy()], x.numpy())
