"""Datasets and the LightningDataModule that splits them.

Splits are a pure function of (dataset, seed, fractions): the teacher, the baseline and the
distilled student of one run, and every later run with the same seed, see the same test rows, so
their metrics compare column by column. Normalisation statistics come from the training split
only and travel inside the model (see `kd_ops.models.zoo.Standardize`), so a served model takes raw
feature rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from kd_ops.config.training import DataConfig
from kd_ops.data.corruptions import CORRUPTIONS
from kd_ops.data.datasets import DATASETS, RawDataset
from kd_ops.data.slicing import InputSlices


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    transfer: np.ndarray
    input_slices: InputSlices = field(default_factory=lambda: InputSlices((0.0, 0.0)))


def make_splits(ds: RawDataset, cfg: DataConfig, seed: int) -> Splits:
    idx = np.arange(len(ds.y))
    rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=ds.y, random_state=seed)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=ds.y[rest], random_state=seed)
    train, val, test = np.sort(train), np.sort(val), np.sort(test)

    transfer = train[~np.isin(ds.y[train], cfg.exclude_classes)]
    if cfg.train_fraction < 1.0:
        n_keep = max(int(round(cfg.train_fraction * len(transfer))), 1)
        n_classes_left = len(np.unique(ds.y[transfer]))
        if n_keep < n_classes_left:
            # Too few rows to stratify: keep a plain random subset.
            rng = np.random.default_rng(seed)
            transfer = np.sort(rng.choice(transfer, size=n_keep, replace=False))
        elif n_keep < len(transfer):
            transfer, _ = train_test_split(transfer, train_size=n_keep, stratify=ds.y[transfer], random_state=seed)
            transfer = np.sort(transfer)
    return Splits(train, val, test, transfer, InputSlices.fit(ds.x[train]))


@dataclass(frozen=True)
class ExtraRows:
    """Rows from outside the dataset that join the transfer set only: recent production inputs
    with the label the teacher gave them (or a feedback label). Val and test stay the dataset's,
    so a student distilled with them is scored on the very rows its predecessor was."""

    x: np.ndarray  # (n, features) raw rows
    y: np.ndarray  # (n,) int labels


def with_extra_rows(ds: RawDataset, splits: Splits, extra: ExtraRows) -> tuple[RawDataset, Splits]:
    if extra.x.ndim != 2 or extra.x.shape[1] != ds.x.shape[1]:
        raise ValueError(f"extra rows have shape {extra.x.shape}, the dataset's rows have {ds.x.shape[1]} features")
    if len(extra.y) != len(extra.x) or (
        len(extra.y) and not 0 <= int(extra.y.min()) <= int(extra.y.max()) < ds.n_classes
    ):
        raise ValueError(f"extra labels must be one int per row in [0, {ds.n_classes})")
    n = len(ds.y)
    raw = RawDataset(
        ds.name,
        np.concatenate([ds.x, extra.x.astype(np.float32)]),
        np.concatenate([ds.y, extra.y.astype(np.int64)]),
        ds.input_shape,
        ds.n_classes,
        ds.max_value,
    )
    new = np.arange(n, n + len(extra.y))
    return raw, Splits(
        splits.train, splits.val, splits.test, np.concatenate([splits.transfer, new]), splits.input_slices
    )


class DistillDataModule(L.LightningDataModule):
    """One dataset, split once per seed; `role` picks which rows `train_dataloader` serves.

    Batches are `(x, y, index)`: the row index lets a loss look up cached teacher outputs.
    `extra` rows are appended to the dataset and join the transfer set only.
    """

    def __init__(self, cfg: DataConfig, seed: int, role: str = "train", extra: ExtraRows | None = None):
        super().__init__()
        if role not in ("train", "transfer"):
            raise ValueError(f"role must be 'train' or 'transfer', got {role!r}")
        self.cfg, self.seed, self.role, self.extra = cfg, seed, role, extra
        self.raw: RawDataset | None = None
        self.splits: Splits | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.raw is None:
            raw = DATASETS.get(self.cfg.name)()
            splits = make_splits(raw, self.cfg, self.seed)
            if self.extra is not None and len(self.extra.y):
                raw, splits = with_extra_rows(raw, splits, self.extra)
            self.raw, self.splits = raw, splits

    def with_role(self, role: str) -> "DistillDataModule":
        """The same splits, serving another set of training rows (no reload, no re-split)."""
        self.setup()
        other = DistillDataModule(self.cfg, self.seed, role, self.extra)
        other.raw, other.splits = self.raw, self.splits
        return other

    # -- facts the models and trackers need ------------------------------------------------
    @property
    def n_features(self) -> int:
        self.setup()
        return int(self.raw.x.shape[1])

    @property
    def n_classes(self) -> int:
        self.setup()
        return self.raw.n_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        return self.raw.input_shape

    def normalization(self) -> tuple[float, float]:
        """Mean and std over all pixels of the training split (one scalar each: images keep their shape)."""
        self.setup()
        x = self.raw.x[self.splits.train]
        return float(x.mean()), float(x.std() + 1e-6)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        self.setup()
        rows = getattr(self.splits, split)
        return self.raw.x[rows], self.raw.y[rows]

    def slices(self, split: str) -> dict[str, np.ndarray]:
        """Slice columns for per-slice metrics: the true class and the ink-intensity tercile."""
        x, y = self.arrays(split)
        return {"label": y.astype(str), **self.input_slices().compute(x)}

    def input_slices(self) -> InputSlices:
        """The slices the server can compute from a row alone (stored with the student)."""
        self.setup()
        return self.splits.input_slices

    def corrupted(self, split: str, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """`arrays(split)` with corruption `kind` applied (see `CORRUPTIONS`); same rows, same labels."""
        x, y = self.arrays(split)
        fn = CORRUPTIONS.get(kind)
        return fn(x, self.raw, np.random.default_rng(seed)).astype(np.float32), y

    def fingerprint(self) -> str:
        """Hash of the data and of the split rows: same fingerprint, same examples in every role."""
        self.setup()
        h = hashlib.sha256()
        h.update(self.raw.name.encode())
        h.update(np.ascontiguousarray(self.raw.x).tobytes())
        h.update(np.ascontiguousarray(self.raw.y).tobytes())
        for part in ("train", "val", "test", "transfer"):
            h.update(part.encode())
            h.update(getattr(self.splits, part).tobytes())
        return h.hexdigest()[:16]

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        rows = getattr(self.splits, split)
        ds = TensorDataset(
            torch.from_numpy(self.raw.x[rows]), torch.from_numpy(self.raw.y[rows]), torch.from_numpy(rows)
        )
        gen = torch.Generator().manual_seed(self.seed)
        # Under DDP each process loads its share of every batch: the effective batch, and so the
        # number of optimizer steps, stays what the config says whatever the number of processes.
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        batch = max(1, self.cfg.batch_size // world)
        return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=gen)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.role, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
