"""The data each run saw, as MLflow dataset inputs, so the MLflow UI shows it beside the metrics.

The lineage tag `kd_ops.dataset_fingerprint` says *that* two runs used the same data; MLflow's
dataset inputs (`mlflow.log_inputs`) show *what* each run saw: the runs table's Datasets column
and each run's inputs list the splits by name ("digits/train", "churn.csv/test"), with the role
each played as the input's context ("training", "transfer", "validation", "test", "production
window"). A re-distilled student lists the production window it learned from.

Nothing is uploaded. Each split is a `MetaDataset` (MLflow's metadata-only dataset): a name, a
digest, a schema (a table's columns and types as the user gave them, or the rows' tensor shape)
and a source (the table's file, or a "code" source naming the bundled dataset or the object given
through the Python API; never a URL with a password). The digest is a hash of the split's rows
and labels, so the same rows get the same digest in every run that sees them (teacher, baseline,
student; a later run with the same seed; a re-distilled version's val and test rows), and MLflow
keeps one dataset per (name, digest) in an experiment. Other rows (another seed, another split,
production rows added to the transfer set) get another digest.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from kd_ops.registry.tracking import TAG_DATASET

if TYPE_CHECKING:
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.data.tables import TableSchema

# The input's context (MLflow's `mlflow.data.context` tag) by the role the rows played in a run.
TRAINING = "training"
TRANSFER = "transfer"
VALIDATION = "validation"
TEST = "test"
PRODUCTION_WINDOW = "production window"
SPLIT_OF = {TRAINING: "train", TRANSFER: "transfer", VALIDATION: "val", TEST: "test"}  # default split per context
DIGEST_CHARS = 16


class RowsDataset(MetaDataset):
    """A `MetaDataset` with a profile (rows, rows per class), which the MLflow UI shows with it."""

    def __init__(self, source: DatasetSource, name: str, digest: str, schema: Schema | None, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


@dataclass(frozen=True)
class DatasetInput:
    """One dataset as one run's input: what `mlflow.log_inputs` takes, kept together."""

    dataset: RowsDataset
    context: str
    tags: dict[str, str] = field(default_factory=dict)


def rows_digest(x: np.ndarray, y: np.ndarray) -> str:
    """A hash of rows and their labels (values, dtypes and shapes): the dataset's MLflow digest."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def _label_type(classes: Sequence[Any]) -> DataType:
    values = [c.item() if isinstance(c, np.generic) else c for c in classes]
    if all(isinstance(v, bool) for v in values):
        return DataType.boolean
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return DataType.long
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return DataType.double
    return DataType.string


def table_columns(schema: "TableSchema") -> Schema:
    """The user's feature columns and types, then the label column: the table as they gave it."""
    kinds = {"categorical": DataType.string, "boolean": DataType.boolean, "text": DataType.string}
    cols = [
        ColSpec(kinds.get(c.kind) or (DataType.long if c.integer else DataType.double), c.name) for c in schema.columns
    ]
    return Schema([*cols, ColSpec(_label_type(schema.classes), schema.label)])


def rows_schema(dm: "DistillDataModule") -> Schema:
    """A table's columns, or for arrays (images) the rows as models read them and the class index."""
    table = dm.schema
    if table is not None:
        return table_columns(table)
    width = tuple(int(d) for d in dm.raw.x.shape[1:])
    return Schema([TensorSpec(np.dtype(np.float32), (-1, *width), "x"), TensorSpec(np.dtype(np.int64), (-1,), "y")])


def _local_source(path: Path) -> DatasetSource:
    """MLflow's own source for a local file (type "local"): the UI shows its path."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers the local source twice ("" and "file:") and says so
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(path))


class RunData:
    """The MLflow datasets of one distillation's data: built once (a digest per split), logged per run.

    `given`: how the Python API's data object is named (`object:pandas...DataFrame`), None for
    data from the config; `fingerprint`: the run's lineage fingerprint, tagged on every input so
    a dataset leads back to the lineage of the version it trained."""

    def __init__(self, dm: "DistillDataModule", fingerprint: str, given: str | None = None):
        dm.setup()
        self.dm, self.fingerprint, self.given = dm, fingerprint, given
        self.name = self._name()
        self.source = self._source()
        self.schema = rows_schema(dm)
        self._datasets: dict[str, RowsDataset] = {}

    def _name(self) -> str:
        cfg = self.dm.cfg
        if self.given is not None:
            return self.dm.raw.name  # "dataframe", or the LightningDataModule's class name
        if cfg.path is not None:
            return Path(cfg.path).name  # "churn.csv"
        return cfg.name

    def _source(self) -> DatasetSource:
        cfg = self.dm.cfg
        if self.given is not None:
            return CodeDatasetSource({"kd_ops.data": self.given, "kd_ops.given_to": "run_distillation(data=...)"})
        if cfg.path is not None:
            path = Path(cfg.path)
            if not path.is_absolute() and self.dm.base_dir:
                path = Path(self.dm.base_dir) / path
            return _local_source(path.resolve())
        tags = {"kd_ops.dataset": cfg.name, "kd_ops.registry": "kd_ops.data.datasets.DATASETS"}
        try:
            from kd_ops.data.datasets import DATASETS

            loader = DATASETS.get(cfg.name)
            tags["kd_ops.loader"] = f"{loader.__module__}.{loader.__qualname__}"
        except Exception:  # noqa: BLE001 - the name only decorates the source
            pass
        return CodeDatasetSource(tags)

    def dataset(self, split: str) -> RowsDataset:
        """The split `train`, `transfer`, `val` or `test` as an MLflow dataset (digest computed once)."""
        if split not in self._datasets:
            x, y = self.dm.arrays(split)
            classes = self.dm.class_names()
            counts = np.bincount(y, minlength=len(classes))
            profile = {"num_rows": int(len(y)), "rows_per_class": {str(c): int(n) for c, n in zip(classes, counts)}}
            self._datasets[split] = RowsDataset(
                self.source, f"{self.name}/{split}", rows_digest(x, y), self.schema, profile
            )
        return self._datasets[split]

    def inputs(self, *contexts: str | tuple[str, str]) -> list[DatasetInput]:
        """Inputs for `contexts`: a context alone takes its own split ("training" the train split),
        `(context, split)` another ("training" on the transfer rows: the labels-only baseline)."""
        out = []
        for item in contexts:
            context, split = item if isinstance(item, tuple) else (item, SPLIT_OF[item])
            ds = self.dataset(split)
            tags = {"rows": str(ds.profile["num_rows"]), TAG_DATASET: self.fingerprint}
            extra = self.dm.extra
            if split == "transfer" and extra is not None and len(extra.y):
                tags["extra_rows"] = str(len(extra.y))  # production rows among them (re-distillation)
            out.append(DatasetInput(ds, context, tags))
        return out


def production_window(
    x: np.ndarray,
    y: np.ndarray,
    *,
    model_name: str,
    store: str,
    schema: Schema | None,
    classes: Sequence[str],
    tags: dict[str, str],
) -> DatasetInput:
    """Recent production inputs (with the labels they were given) as the input "production window".

    `store` is shown as the source: pass it masked (no password); `classes` names the class
    indices of `y`; `tags` says what the window was (the versions that served it, its time range,
    the feedback- and teacher-labelled shares)."""
    source = CodeDatasetSource({"kd_ops.prediction_log": store, "kd_ops.model": model_name})
    counts = np.bincount(y, minlength=len(classes))
    profile = {"num_rows": int(len(y)), "rows_per_class": {str(c): int(n) for c, n in zip(classes, counts)}}
    ds = RowsDataset(source, f"{model_name}/production window", rows_digest(x, y), schema, profile)
    return DatasetInput(ds, PRODUCTION_WINDOW, {"rows": str(len(y)), **{k: str(v)[:500] for k, v in tags.items()}})


# What a SQL store says when two processes insert the same new dataset at once
_DUPLICATE = ("unique constraint", "duplicate key", "integrityerror")


def log_inputs(inputs: Sequence[DatasetInput], attempts: int = 3) -> None:
    """Every input into the active run in one call (MLflow keeps one input per dataset and run).

    MLflow's SQL store looks a dataset up and inserts it if absent, in two steps: runs in parallel
    processes (`kd-ops sweep` cells) that log the same split first lose that race with a UNIQUE
    constraint error. The dataset exists by then, so the call is repeated and links to it."""
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    if not inputs:
        return
    for attempt in range(attempts):
        try:
            mlflow.log_inputs(
                [i.dataset for i in inputs], contexts=[i.context for i in inputs], tags_list=[i.tags for i in inputs]
            )
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not any(d in str(exc).lower() for d in _DUPLICATE):
                raise
            time.sleep(0.2 * (attempt + 1))


__all__ = [
    "PRODUCTION_WINDOW",
    "TEST",
    "TRAINING",
    "TRANSFER",
    "VALIDATION",
    "DatasetInput",
    "RowsDataset",
    "RunData",
    "log_inputs",
    "production_window",
    "rows_digest",
    "rows_schema",
    "table_columns",
]
