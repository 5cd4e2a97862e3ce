"""Datasets and the LightningDataModule that splits them.

Splits are a pure function of (dataset, seed, fractions): the teacher, the baseline and the
distilled student of one run, and every later run with the same seed, see the same test rows, so
their metrics compare column by column. Normalisation statistics come from the training split
only and travel inside the model (see `kd_ops.models.zoo.Standardize`), so a served model takes raw
feature rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from kd_ops.config.training import DataConfig
from kd_ops.core.errors import ConfigError
from kd_ops.data.corruptions import CORRUPTIONS
from kd_ops.data.datasets import DATASETS, RawDataset, TableSource
from kd_ops.data.slicing import ColumnSlices, InputSlices, Slicer

if TYPE_CHECKING:
    from kd_ops.data.tables import TableSpec


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    transfer: np.ndarray
    input_slices: Slicer = field(default_factory=lambda: InputSlices((0.0, 0.0)))
    # The transfer rows that keep their labels (`data.labelled_fraction`); None: all of them.
    labelled: np.ndarray | None = None

    @property
    def labelled_rows(self) -> np.ndarray:
        """The transfer rows whose labels training may read (the labels-only baseline's rows)."""
        return self.transfer if self.labelled is None else self.labelled


def _stratified_subset(rows: np.ndarray, y: np.ndarray, share: float, seed: int) -> np.ndarray:
    """`share` of `rows`, stratified by label where there are enough rows for every class."""
    n_keep = max(int(round(share * len(rows))), 1)
    if n_keep >= len(rows):
        return rows
    if n_keep < len(np.unique(y[rows])):  # too few rows to stratify: a plain random subset
        return np.sort(np.random.default_rng(seed).choice(rows, size=n_keep, replace=False))
    keep, _ = train_test_split(rows, train_size=n_keep, stratify=y[rows], random_state=seed)
    return np.sort(keep)


def split_rows(
    y: np.ndarray, cfg: DataConfig, seed: int, order: np.ndarray | None = None, test: np.ndarray | None = None
) -> Splits:
    """Train, val, test and transfer rows. With `order` (row positions in time order) the split is
    by time: the earliest rows train, the next validate, the latest test; with `test` (a dataset's
    own test rows) val is drawn stratified from the other rows; else stratified at random."""
    if test is not None:
        rest = np.setdiff1d(np.arange(len(y)), test)
        try:
            train, val = train_test_split(rest, test_size=cfg.val_fraction, stratify=y[rest], random_state=seed)
        except ValueError as exc:
            raise ConfigError(f"data: cannot split the rows stratified by label: {exc}") from None
    elif order is not None:
        n = len(order)
        n_test = max(int(round(cfg.test_fraction * n)), 1)
        n_val = max(int(round(cfg.val_fraction * n)), 1)
        train, val, test = order[: n - n_val - n_test], order[n - n_val - n_test : n - n_test], order[n - n_test :]
        if len(np.unique(y[train])) < 2:
            raise ConfigError("data.split = 'time': the earliest rows (the training split) hold one class only")
    else:
        idx = np.arange(len(y))
        try:
            rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=y, random_state=seed)
            val_share = cfg.val_fraction / (1 - cfg.test_fraction)
            train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=seed)
        except ValueError as exc:  # a class too rare to stratify
            raise ConfigError(f"data: cannot split the rows stratified by label: {exc}") from None
    train, val, test = np.sort(train), np.sort(val), np.sort(test)

    transfer = train[~np.isin(y[train], cfg.exclude_classes)]
    if cfg.train_fraction < 1.0:
        transfer = _stratified_subset(transfer, y, cfg.train_fraction, seed)
    labelled = None
    if cfg.labelled_fraction < 1.0:
        # Its own stream of randomness: the same labelled rows whatever else the seed draws.
        labelled = _stratified_subset(transfer, y, cfg.labelled_fraction, seed + 7919)
    return Splits(train, val, test, transfer, labelled=labelled)


def make_splits(ds: RawDataset, cfg: DataConfig, seed: int) -> Splits:
    splits = split_rows(ds.y, cfg, seed, test=ds.test_rows)
    splits.input_slices = InputSlices.fit(ds.x[splits.train])
    return splits


def table_spec(cfg: DataConfig, defaults: dict[str, Any]) -> "TableSpec":
    """The config's `data.*` keys over a registered table's defaults."""
    from kd_ops.data.tables import TableSpec

    given = cfg.model_fields_set
    keys = ("label", "features", "categorical", "numeric", "boolean", "text", "time", "slices", "split")
    merged = {k: getattr(cfg, k) if k in given or k not in defaults else defaults[k] for k in keys}
    merged["split"] = merged["split"] or "random"
    merged["drop"] = list(defaults.get("drop", []))
    for key in ("max_length", "vocab_size"):
        merged[key] = getattr(cfg, key) if key in given or key not in defaults else defaults[key]
    if not merged["label"]:
        raise ConfigError("data.label: name the column to predict")
    if merged["split"] == "time" and not merged["time"]:
        raise ConfigError("data.split = 'time' needs data.time: the column that orders the rows")
    return TableSpec(**merged)


def rows_before(frame: Any, spec: "TableSpec", until: str, where: str) -> Any:
    """The rows of `frame` whose time is before `until` (`data.until`): a first student is
    distilled on what was known then, and the rest of the table is the traffic that follows."""
    import pandas as pd

    from kd_ops.data.tables import time_values

    if not spec.time:
        raise ConfigError(f"data.until = {until!r} needs data.time: the column that orders the rows")
    if spec.time not in frame.columns:
        raise ConfigError(f"data.time = {spec.time!r}: {where} has no such column")
    keep = time_values(frame, spec.time, where) < np.datetime64(pd.Timestamp(until).to_datetime64())
    if keep.sum() < 10:
        raise ConfigError(f"data.until = {until!r}: {where} holds {int(keep.sum())} rows before it (at least 10)")
    return frame[keep]


def source_table(cfg: DataConfig, base_dir: str | None = None) -> tuple[Any, dict[str, Any], str, str]:
    """The whole table a config names (a file or a registered table dataset), before `data.rows`
    and `data.until` cut it: (frame, the dataset's own `data.*` defaults, name, where it came
    from). What `kd-ops replay` sends as traffic. A dataset of images is a `ConfigError`."""
    from pathlib import Path

    if cfg.path is not None:
        from kd_ops.data.tables import read_table_file

        path = Path(cfg.path)
        if not path.is_absolute() and base_dir:
            path = Path(base_dir) / path
        return read_table_file(path), {}, cfg.source_name, f"file {str(path)!r}"
    source = DATASETS.get(cfg.name)()
    if not isinstance(source, TableSource):
        raise ConfigError(f"data.name = {cfg.name!r} is not a table: replaying traffic in time order needs one")
    return source.frame, source.spec, source.name, f"dataset {source.name!r}"


def load_table(frame: Any, cfg: DataConfig, seed: int, name: str, defaults: dict[str, Any], where: str):
    """A DataFrame checked, split (by time or stratified), fitted on its training rows and encoded."""
    import pandas as pd

    from kd_ops.data.tables import prepare_table

    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(f"data: expected a pandas DataFrame, got {type(frame).__name__}")
    if cfg.rows is not None and cfg.rows < len(frame):
        keep = np.sort(np.random.default_rng(0).choice(len(frame), size=cfg.rows, replace=False))
        frame = frame.iloc[keep]
    spec = table_spec(cfg, defaults)
    if cfg.until is not None:
        frame = rows_before(frame, spec, cfg.until, where)
    holder: dict[str, Splits] = {}

    def train_rows(y: np.ndarray, order: np.ndarray | None) -> np.ndarray:
        holder["splits"] = split_rows(y, cfg, seed, order if spec.split == "time" else None)
        return holder["splits"].train

    table = prepare_table(frame, spec, where, train_rows)
    splits = holder["splits"]
    splits.input_slices = ColumnSlices.fit(table.schema, table.x[splits.train])
    raw = RawDataset(name, table.x, table.y, (table.x.shape[1],), table.schema.n_classes, 1.0, table.schema)
    return raw, splits, table


@dataclass(frozen=True)
class ExtraRows:
    """Rows from outside the dataset that join the transfer set only: recent production inputs
    with the label the teacher gave them (or a feedback label). Val and test stay the dataset's,
    so a student distilled with them is scored on the very rows its predecessor was."""

    x: np.ndarray  # (n, features) raw rows
    y: np.ndarray  # (n,) int labels
    # (n,) bool: the label is a true one (feedback), not the teacher's; None: all true
    known: np.ndarray | None = None


def with_extra_rows(ds: RawDataset, splits: Splits, extra: ExtraRows) -> tuple[RawDataset, Splits]:
    if extra.x.ndim != 2 or extra.x.shape[1] != ds.x.shape[1]:
        raise ValueError(f"extra rows have shape {extra.x.shape}, the dataset's rows have {ds.x.shape[1]} features")
    if len(extra.y) != len(extra.x) or (
        len(extra.y) and not 0 <= int(extra.y.min()) <= int(extra.y.max()) < ds.n_classes
    ):
        raise ValueError(f"extra labels must be one int per row in [0, {ds.n_classes})")
    n = len(ds.y)
    raw = dataclasses.replace(
        ds,
        x=np.concatenate([ds.x, extra.x.astype(np.float32)]),
        y=np.concatenate([ds.y, extra.y.astype(np.int64)]),
    )
    new = np.arange(n, n + len(extra.y))
    labelled = None if splits.labelled is None else np.concatenate([splits.labelled, new])  # teacher's or true
    return raw, Splits(
        splits.train, splits.val, splits.test, np.concatenate([splits.transfer, new]), splits.input_slices, labelled
    )


ROLES = {"train": "train", "transfer": "transfer", "labelled": "labelled_rows"}  # role -> rows of Splits
UNLABELLED = -1  # the label a batch carries for a row whose label training may not read


class DistillDataModule(L.LightningDataModule):
    """One dataset, split once per seed; `role` picks which rows `train_dataloader` serves.

    Batches are `(x, y, index)`: the row index lets a loss look up cached teacher outputs.
    `extra` rows are appended to the dataset and join the transfer set only. Roles: `train` (the
    teacher's rows), `transfer` (the student's: with `data.labelled_fraction` < 1 its unlabelled
    rows carry the label -1, which cross-entropy skips) and `labelled` (the labels-only baseline's).
    """

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        role: str = "train",
        extra: ExtraRows | None = None,
        frame: Any = None,
        base_dir: str | None = None,
    ):
        """`frame`: a pandas DataFrame given through the Python API (`run_distillation(data=...)`),
        read with the config's `data.*` keys; `base_dir`: where a relative `data.path` starts."""
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.cfg, self.seed, self.role, self.extra = cfg, seed, role, extra
        self.frame, self.base_dir = frame, base_dir
        self.raw: RawDataset | None = None
        self.splits: Splits | None = None
        self.table = None  # a PreparedTable for tabular data (the user's frame beside the encoded rows)

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.raw is None:
            raw, splits = self._load()
            if self.extra is not None and len(self.extra.y):
                raw, splits = with_extra_rows(raw, splits, self.extra)
            self.raw, self.splits = raw, splits

    def _load(self) -> tuple[RawDataset, Splits]:
        cfg = self.cfg
        if self.frame is not None:
            raw, splits, self.table = load_table(self.frame, cfg, self.seed, "dataframe", {}, "the DataFrame")
            return raw, splits
        if cfg.path is None:
            source = DATASETS.get(cfg.name)()
            if not isinstance(source, TableSource):
                return source, make_splits(source, cfg, self.seed)
        frame, defaults, name, where = source_table(cfg, self.base_dir)
        raw, splits, self.table = load_table(frame, cfg, self.seed, name, defaults, where)
        return raw, splits

    def with_role(self, role: str) -> "DistillDataModule":
        """The same splits, serving another set of training rows (no reload, no re-split)."""
        self.setup()
        other = DistillDataModule(self.cfg, self.seed, role, self.extra, self.frame, self.base_dir)
        other.raw, other.splits, other.table = self.raw, self.splits, self.table
        return other

    def with_training_rows(self, extra: ExtraRows) -> "DistillDataModule":
        """The same splits with `extra` rows added to the training split (a teacher refitted on
        labelled recent traffic); val and test stay the dataset's, so scores stay comparable."""
        self.setup()
        other = self.with_role(self.role)
        n = len(self.raw.y)
        other.raw, _ = with_extra_rows(self.raw, self.splits, extra)
        other.splits = dataclasses.replace(
            self.splits, train=np.concatenate([self.splits.train, np.arange(n, n + len(extra.y))])
        )
        return other

    @property
    def schema(self):
        """The table's schema (`kd_ops.data.tables.TableSchema`), or None for image data."""
        self.setup()
        return self.raw.table

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
        """Mean and std over all pixels of the training split (one scalar each: images keep their shape).
        A table's columns are scaled one by one in the network's input layer instead: (0, 1)."""
        self.setup()
        if self.raw.table is not None:
            return 0.0, 1.0
        x = self.raw.x[self.splits.train]
        return float(x.mean()), float(x.std() + 1e-6)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw rows and their true labels of a split or role (`transfer` holds unlabelled rows too:
        what training may read of their labels is the `labelled` role's)."""
        rows = self.rows(split)
        return self.raw.x[rows], self.raw.y[rows]

    def slices(self, split: str) -> dict[str, np.ndarray]:
        """Slice columns for per-slice metrics: the true class and the ink-intensity tercile."""
        x, y = self.arrays(split)
        return {"label": self.class_names()[y], **self.input_slices().compute(x)}

    def class_names(self) -> np.ndarray:
        """Each class index's name as text: the user's labels for a table, "0".."C-1" for images."""
        self.setup()
        if self.raw.table is not None:
            return np.asarray([str(c) for c in self.raw.table.classes])
        return np.asarray([str(i) for i in range(self.raw.n_classes)])

    def input_slices(self) -> Slicer:
        """The slices the server can compute from a row alone (stored with the student)."""
        self.setup()
        return self.splits.input_slices

    def corrupted(self, split: str, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """`arrays(split)` with corruption `kind` applied (see `CORRUPTIONS`); same rows, same labels."""
        x, y = self.arrays(split)
        if self.raw.table is not None:
            raise ConfigError(f"corruption {kind!r} is for images; a table has none (evaluation.robustness: false)")
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
        if self.splits.labelled is not None:  # which labels training reads shapes the result too
            h.update(b"labelled")
            h.update(self.splits.labelled.tobytes())
        return h.hexdigest()[:16]

    # -- loaders ---------------------------------------------------------------------------
    def rows(self, split: str) -> np.ndarray:
        """The dataset rows of a split or a role (`labelled`: the transfer rows that keep labels)."""
        self.setup()
        return getattr(self.splits, ROLES.get(split, split))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rows = self.rows(split)
        y = self.raw.y[rows]
        if split == "transfer" and self.splits.labelled is not None:
            y = np.where(np.isin(rows, self.splits.labelled), y, UNLABELLED)
        ds = TensorDataset(torch.from_numpy(self.raw.x[rows]), torch.from_numpy(y), torch.from_numpy(rows))
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
