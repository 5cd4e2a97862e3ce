"""A window of the prediction log, checked against the reference before anything is computed on it.

The log can hold several versions of a model (a hot swap happens mid-window); a window judges
one version, the one that served the newest prediction, because drift and accuracy are about the
model that made the predictions.

A table model's log holds each row as the raw record the client sent (the original column names,
null for a missing value). The window encodes those records with the served version's schema
(the encoded rows the model read: slices and re-distillation need them), decodes them into typed
columns under the user's names (what drift is tested on, column by column), and marks the
categorical values the training split never held (the unseen-category signal): encoding alone
would make them look merely missing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from kd_ops.core.errors import ConfigError
from kd_ops.prediction_log.reader import read_predictions

if TYPE_CHECKING:
    from kd_ops.data.slicing import Slicer
    from kd_ops.data.tables import TableSchema

REQUIRED = ("id", "created_at", "model_version", "inputs", "probabilities", "predicted_class", "confidence")


class WindowError(ConfigError):
    """The window cannot be judged as given (missing or extra columns, wrong types): says which."""


@dataclass(frozen=True)
class Window:
    model_name: str
    model_version: str
    x: np.ndarray  # (n, features) float32
    probabilities: np.ndarray  # (n, classes)
    labels: np.ndarray  # (n,) float, NaN where no feedback arrived
    teacher_class: np.ndarray  # (n,) float, NaN where the shadow teacher did not score
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # slice name -> (n,) str ("" if absent)
    first: str | None = None
    last: str | None = None
    # Tables only: the served version's schema, the rows as typed columns under the user's names
    # (`kd_ops.evaluation.reference.typed_columns`), and per categorical column which rows hold a
    # value the training split never held.
    schema: "TableSchema | None" = None
    table: pd.DataFrame | None = None
    unseen: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n,) bool
    # Per text column which rows held a text longer than its max_length (the model read it cut).
    truncated: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n,) bool
    # Encoded rows -> the served network's embeddings (the input of its last linear layer), for
    # embedding drift; None where the served model is not a network or the monitor did not load it.
    embed: Callable[[np.ndarray], np.ndarray] | None = None
    # Labels arrive late and for some rows only: with `monitor.label_window_rows`, accuracy is
    # judged on the labelled rows of the served version over a longer stretch of the log than the
    # window (a window of its own, labelled rows only); None: on the window's own labelled rows.
    feedback: "Window | None" = None

    @property
    def rows(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> "Window":
        """The rows accuracy is judged on: the feedback window if there is one, else this one
        (whose unlabelled rows the accuracy signals skip)."""
        return self.feedback if self.feedback is not None else self

    @property
    def unseen_rows(self) -> np.ndarray:
        """(n,) bool: the rows with at least one category the training split never held."""
        out = np.zeros(self.rows, dtype=bool)
        for mask in self.unseen.values():
            out |= mask
        return out

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) if self.rows else np.zeros(0, dtype=int)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1) if self.rows else np.zeros(0)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "model_version": self.model_version,
            "rows": self.rows,
            "labelled_rows": int(np.isfinite(self.labelled.labels).sum()),
            "shadow_rows": int(np.isfinite(self.teacher_class).sum()),
            "first": self.first,
            "last": self.last,
        }
        if self.feedback is not None:  # where the labelled rows came from: not only the window
            out["labelled_in_window"] = int(np.isfinite(self.labels).sum())
            out["labelled_first"], out["labelled_last"] = self.feedback.first, self.feedback.last
        if self.schema is not None:
            out["unseen_category_rows"] = int(self.unseen_rows.sum())
        for name, mask in self.truncated.items():
            out[f"truncated_texts_{name}"] = int(mask.sum())
        return out


def _matrix(column: pd.Series, name: str, width: int | None) -> np.ndarray:
    lengths = column.map(lambda v: len(v) if isinstance(v, (list, tuple, np.ndarray)) else -1)
    if (lengths < 0).any():
        bad = column.index[lengths < 0][0]
        raise WindowError(f"column {name!r}: row {bad} holds {type(column[bad]).__name__}, not a list of numbers")
    expected = width if width is not None else int(lengths.iloc[0])
    wrong = lengths[lengths != expected]
    if len(wrong):
        more_or_fewer = "extra" if wrong.iloc[0] > expected else "missing"
        raise WindowError(
            f"column {name!r}: row {wrong.index[0]} has {wrong.iloc[0]} values where the reference has {expected} "
            f"({more_or_fewer} columns)"
        )
    try:
        return np.asarray(column.tolist(), dtype=np.float32).reshape(len(column), expected)
    except (TypeError, ValueError):
        raise WindowError(f"column {name!r}: holds values that are not numbers") from None


def _row_name(frame: pd.DataFrame, i: int) -> str:
    return f"id={frame['id'].iloc[i]!r}" if "id" in frame.columns else str(i)


def _table_rows(
    frame: pd.DataFrame, schema: "TableSchema"
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encoded rows of a table window, per categorical column the rows whose value the training
    split never held, and per text column the rows whose text was truncated. Records (what the
    server logs for a table) are encoded with
    `schema.encode(strict=False)`: a field the model does not take is ignored, as the server
    ignored it; lists are encoded rows as older servers logged them (their unseen values are
    lost: NaN already)."""
    from kd_ops.data.tables import category_keys

    values = frame["inputs"]
    is_record = values.map(lambda v: isinstance(v, dict)).to_numpy(dtype=bool)
    x = np.empty((len(frame), schema.width), dtype=np.float32)
    unseen = {c.name: np.zeros(len(frame), dtype=bool) for c in schema.columns if c.kind == "categorical"}
    truncated = {c.name: np.zeros(len(frame), dtype=bool) for c in schema.columns if c.kind == "text"}
    if (~is_record).any():
        x[~is_record] = _matrix(values[~is_record], "inputs", schema.width)
    if is_record.any():
        index = frame["id"][is_record] if "id" in frame.columns else None
        raw = pd.DataFrame.from_records(values[is_record].tolist(), index=index)
        try:
            x[is_record], cut = schema.encode_counting(raw, where="column 'inputs'", strict=False)
        except ConfigError as exc:
            raise WindowError(str(exc)) from None
        for name, mask in cut.items():
            truncated[name][is_record] = mask
        # A value that is present in the record but NaN once encoded is a category never seen in training.
        for name in unseen:
            present = category_keys(raw[name]).notna().to_numpy()
            unseen[name][is_record] = present & np.isnan(x[is_record, schema.position(name)])
    return x, unseen, truncated


def _fill_slices(stored: dict[str, np.ndarray], x: np.ndarray, slicer: "Slicer | None") -> dict[str, np.ndarray]:
    """The logged slices, and the slicer's cut of the encoded rows where a row was logged without
    one (the server stores the same slicer's values, so both agree where both exist)."""
    if slicer is None or not len(x):
        return stored
    out = dict(stored)
    for name, computed in slicer.compute(x).items():
        given = out.get(name)
        out[name] = computed if given is None else np.where(given == "", computed, given)
    return out


def window_from_frame(
    frame: pd.DataFrame,
    model_name: str,
    n_features: int,
    n_classes: int,
    schema: "TableSchema | None" = None,
    slicer: "Slicer | None" = None,
) -> Window:
    """Check a frame shaped like `read_predictions`' output and turn it into arrays.

    `schema`: the served version's table schema (None for an array model), with which the
    records are encoded and decoded; `slicer`: the version's slicer, for rows logged without slices."""
    if frame.empty:
        width = schema.width if schema is not None else n_features
        return Window(model_name, "", np.zeros((0, width), np.float32), np.zeros((0, n_classes)), *[np.zeros(0)] * 2)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise WindowError(f"the window lacks column(s) {', '.join(missing)}")
    version = str(frame["model_version"].iloc[-1])  # the version that served the newest prediction
    frame = frame[frame["model_version"].astype(str) == version].reset_index(drop=True)
    unseen: dict[str, np.ndarray] = {}
    truncated: dict[str, np.ndarray] = {}
    if schema is not None:
        x, unseen, truncated = _table_rows(frame, schema)  # NaN is a missing value there, not a fault
    else:
        records = frame["inputs"].map(lambda v: isinstance(v, dict))
        if records.any():
            raise WindowError(
                f"column 'inputs': row {_row_name(frame, int(np.flatnonzero(records)[0]))} holds a record "
                "(a table row) but the served version has no table schema"
            )
        x = _matrix(frame["inputs"], "inputs", n_features)
    probs = _matrix(frame["probabilities"], "probabilities", n_classes)
    for name, values in (("inputs", x), ("probabilities", probs)):
        if name == "inputs" and schema is not None:
            continue
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            raise WindowError(f"column {name!r}: row {_row_name(frame, bad[0])} holds NaN or infinite values")

    def numeric(name: str) -> np.ndarray:
        if name not in frame.columns:
            return np.full(len(frame), np.nan)
        try:
            return pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=float)
        except (TypeError, ValueError):
            raise WindowError(f"column {name!r}: holds values that are not numbers") from None

    slices = {
        c.removeprefix("slice_"): frame[c].fillna("").astype(str).to_numpy()
        for c in frame.columns
        if c.startswith("slice_")
    }
    stamp = pd.to_datetime(frame["created_at"])
    from kd_ops.evaluation.reference import typed_columns

    return Window(
        model_name,
        version,
        x,
        probs,
        numeric("label"),
        numeric("teacher_class"),
        _fill_slices(slices, x, slicer),
        first=stamp.min().isoformat(),
        last=stamp.max().isoformat(),
        schema=schema,
        table=typed_columns(schema, x) if schema is not None else None,
        unseen=unseen,
        truncated=truncated,
    )


def feedback_frame(longer: pd.DataFrame, version: str) -> pd.DataFrame:
    """The labelled predictions of `version` in `longer`, the latest `monitor.label_window_rows`
    of the log: labels that arrived late for predictions before the window count, each under the
    version that made the prediction it labels."""
    if longer.empty or "label" not in longer.columns:
        return longer.iloc[0:0]
    keep = (longer["model_version"].astype(str) == version) & pd.to_numeric(longer["label"], errors="coerce").notna()
    return longer[keep].reset_index(drop=True)


def read_window(store: str, model_name: str, rows: int | None = None, minutes: float | None = None) -> pd.DataFrame:
    """The latest `rows` predictions (or those of the last `minutes`) of `model_name` in `store`,
    as `read_predictions` gives them. A store that cannot be read as a log, or a stored value that
    cannot be decoded (`StoredValueError`: names table, column and row), is a `WindowError`."""
    since = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=minutes) if minutes else None
    try:
        return read_predictions(store, model_name=model_name, since=since, last=rows)
    except ValueError as exc:
        raise WindowError(f"monitor.store: {exc}") from None


def served_version(frame: pd.DataFrame) -> str:
    """The version a window judges: the one that served its newest prediction."""
    if "model_version" not in frame.columns:
        raise WindowError("the window lacks column(s) model_version")
    return str(frame["model_version"].iloc[-1])


def holds_records(frame: pd.DataFrame) -> bool:
    """Whether the window's inputs are table records (the served model takes a table)."""
    return "inputs" in frame.columns and bool(frame["inputs"].map(lambda v: isinstance(v, dict)).any())


def served_schema(name: str, version: str, allow_pickle: bool = False) -> "TableSchema | None":
    """The table schema of registered version `name`/`version`, from the model itself: for a
    reference stored before references carried the schema (the usual source, one read fewer)."""
    from kd_ops.models.loading import load_model

    model: Any = load_model(f"models:/{name}/{version}", allow_pickle=allow_pickle)
    return getattr(model, "schema", None)


def load_window(
    store: str,
    model_name: str,
    n_features: int,
    n_classes: int,
    rows: int | None = None,
    minutes: float | None = None,
    schema: "TableSchema | None" = None,
    slicer: "Slicer | None" = None,
) -> Window:
    """The latest `rows` predictions (or those of the last `minutes`) of `model_name` in `store`
    (see `read_window`), checked and turned into a `Window` (see `window_from_frame`)."""
    frame = read_window(store, model_name, rows, minutes)
    return window_from_frame(frame, model_name, n_features, n_classes, schema, slicer)
