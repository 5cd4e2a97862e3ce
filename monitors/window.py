"""A window of the prediction log, checked against the reference before anything is computed on it.

The log can hold several versions of a model (a hot swap happens mid-window); a window judges
one version, the one that served the newest prediction, because drift and accuracy are about the
model that made the predictions.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kd_ops.core.errors import ConfigError
from kd_ops.prediction_log.reader import read_predictions

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

    @property
    def rows(self) -> int:
        return len(self.x)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) if self.rows else np.zeros(0, dtype=int)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1) if self.rows else np.zeros(0)

    def describe(self) -> dict[str, object]:
        return {
            "model_version": self.model_version,
            "rows": self.rows,
            "labelled_rows": int(np.isfinite(self.labels).sum()),
            "shadow_rows": int(np.isfinite(self.teacher_class).sum()),
            "first": self.first,
            "last": self.last,
        }


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


def window_from_frame(frame: pd.DataFrame, model_name: str, n_features: int, n_classes: int) -> Window:
    """Check a frame shaped like `read_predictions`' output and turn it into arrays."""
    if frame.empty:
        return Window(
            model_name, "", np.zeros((0, n_features), np.float32), np.zeros((0, n_classes)), *[np.zeros(0)] * 2
        )
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise WindowError(f"the window lacks column(s) {', '.join(missing)}")
    version = str(frame["model_version"].iloc[-1])  # the version that served the newest prediction
    frame = frame[frame["model_version"].astype(str) == version].reset_index(drop=True)
    x = _matrix(frame["inputs"], "inputs", n_features)
    probs = _matrix(frame["probabilities"], "probabilities", n_classes)
    for name, values in (("inputs", x), ("probabilities", probs)):
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
    return Window(
        model_name,
        version,
        x,
        probs,
        numeric("label"),
        numeric("teacher_class"),
        slices,
        first=stamp.min().isoformat(),
        last=stamp.max().isoformat(),
    )


def load_window(
    store: str, model_name: str, n_features: int, n_classes: int, rows: int | None = None, minutes: float | None = None
) -> Window:
    """The latest `rows` predictions (or those of the last `minutes`) of `model_name` in `store`.

    A store that cannot be read as a log, or a stored value that cannot be decoded
    (`StoredValueError`: names table, column and row), is a `WindowError`."""
    since = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=minutes) if minutes else None
    try:
        frame = read_predictions(store, model_name=model_name, since=since, last=rows)
    except ValueError as exc:
        raise WindowError(f"monitor.store: {exc}") from None
    return window_from_frame(frame, model_name, n_features, n_classes)
