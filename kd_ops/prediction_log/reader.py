"""Windows of the log for the monitor and re-distillation: the latest N rows, or since a time."""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

import numpy as np
import orjson
import sqlalchemy as sa

from kd_ops.prediction_log.store import _chunks, feedback, open_store, predictions, shadow


class StoredValueError(ValueError):
    """A value in the log that cannot be read back as the writer stores it: JSON that does not
    parse (NaN or Infinity written by hand, a number beyond float range, a truncated text),
    probabilities that are not lists of finite numbers (orjson writes NaN as null), or inputs that
    are neither such a list (an array model's row) nor a flat record (a table model's row).
    Names the table, the column and the row."""

    def __init__(self, table: str, column: str, prediction_id: str, why: str, row_id: int | None = None):
        self.table, self.column, self.prediction_id, self.row_id = table, column, prediction_id, row_id
        row = f"id={prediction_id!r}" if row_id is None else f"id={row_id} (prediction_id={prediction_id!r})"
        super().__init__(f"table {table}, column {column}, row {row}: {why}")


_WINDOW_CHUNK = 500  # ids per `IN (...)`: well under SQLite's variable limit (999 on old builds)
_JSON_TEXT = ("inputs", "probabilities", "slices")  # read as text and decoded here, so a bad row is named
_RECORD_VALUES = (str, int, float, bool, type(None))  # what a JSON object's field holds in a table row


def _decode(text: Any, table: str, column: str, prediction_id: str, row_id: int | None = None) -> Any:
    try:
        return orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise StoredValueError(table, column, prediction_id, f"not valid JSON ({exc})", row_id) from None


def _not_numbers(value: Any) -> str | None:
    """Why `value` is not a list of finite numbers, or None if it is."""
    if not isinstance(value, list):
        return f"holds {type(value).__name__}, not a list of numbers"
    try:
        arr = np.asarray(value)
    except ValueError:
        return "holds nested lists of different lengths"
    if arr.dtype.kind in "iuf":
        return None if np.isfinite(arr).all() else "holds NaN or infinite numbers"
    if arr.dtype == object and any(v is None for v in arr.ravel()):
        return "holds null where a number belongs (a NaN or infinite value when it was written)"
    return "holds values that are not numbers"


def _check_numbers(
    values: list[Any], table: str, column: str, prediction_ids: list[str], row_ids: list[int] | None = None
) -> None:
    """Raise `StoredValueError` for the first value that is not a list of finite numbers: one numpy
    pass when the column is a clean matrix (the usual case), row by row only to find the culprit."""
    try:
        arr = np.asarray(values)
        if arr.dtype.kind in "iuf" and arr.ndim >= 2 and np.isfinite(arr).all():
            return
    except ValueError:  # rows of different lengths: fine here (the monitor names those), check each
        pass
    for i, value in enumerate(values):
        why = _not_numbers(value)
        if why is not None:
            raise StoredValueError(table, column, prediction_ids[i], why, row_ids[i] if row_ids else None)


def _not_record(value: dict[str, Any]) -> str | None:
    """Why `value` is not a table row as the server stores it (a flat JSON object: the original
    column names, a value or null each), or None if it is."""
    for key, v in value.items():
        if not isinstance(v, _RECORD_VALUES):
            return f"holds a record whose field {key!r} is a {type(v).__name__}, not a single value"
    return None


def _check_inputs(values: list[Any], prediction_ids: list[str]) -> None:
    """Inputs are kept as stored: a list of finite numbers per row (an array model: pixels, or
    the encoded rows older servers logged for tables) or a record per row (a table model: the
    raw values the client sent, so the monitor sees categories the model never learnt). A log
    holds both when it serves both kinds of model; each row is checked as what it is."""
    records = [i for i, v in enumerate(values) if isinstance(v, dict)]
    for i in records:
        why = _not_record(values[i])
        if why is not None:
            raise StoredValueError(predictions.name, "inputs", prediction_ids[i], why)
    if len(records) == len(values):
        return
    if records:
        keep = sorted(set(range(len(values))) - set(records))
        values, prediction_ids = [values[i] for i in keep], [prediction_ids[i] for i in keep]
    _check_numbers(values, predictions.name, "inputs", prediction_ids)


def _window_rows(
    conn: sa.Connection, model_name: str | None, since: dt.datetime | None, last: int | None, ids: Sequence[str] | None
) -> list[sa.Row]:
    """The window's prediction rows, oldest first, JSON columns as text.

    With `last`, the `last`-th newest `created_at` comes off the (model_name, created_at) index (an
    OFFSET on the index order, no sort), then the rows at or after it (the window, plus any rows
    tied with its oldest timestamp) are fetched through the same index and ordered here with the
    tie-break keys, so those keys never make the store sort the model's whole log. The bound is a
    value, not a subquery, so PostgreSQL's planner estimates the range from its statistics."""
    p = predictions.c
    conds: list[Any] = []
    if model_name is not None:
        conds.append(p.model_name == model_name)
    if since is not None:
        conds.append(p.created_at >= since)
    groups = [conds]
    if ids is not None:  # chunked under the variable limit; the top `last` of the union is in the chunks' tops
        groups = [[*conds, p.id.in_(chunk)] for chunk in _chunks(list(dict.fromkeys(ids)), _WINDOW_CHUNK)]
    # SQLite keeps times as text: the bound goes back as the stored text, never re-formatted.
    stored_time = sa.type_coerce(p.created_at, sa.String) if conn.dialect.name == "sqlite" else p.created_at
    columns = [sa.cast(c, sa.Text).label(c.key) if c.key in _JSON_TEXT else c for c in predictions.columns]
    rows: list[sa.Row] = []
    for where in groups:
        if last == 0:
            break
        query = sa.select(*columns).where(*where)
        if last is not None:
            bound = conn.execute(
                sa.select(stored_time).where(*where).order_by(p.created_at.desc()).offset(last - 1).limit(1)
            ).scalar()
            if bound is not None:  # else fewer than `last` rows match: all of them
                query = query.where(stored_time >= bound)
        rows += conn.execute(query).all()
    # The log's order: newest first, ties by request id, then row index descending (stable sorts).
    rows.sort(key=lambda r: r.row_index, reverse=True)
    rows.sort(key=lambda r: r.request_id)
    rows.sort(key=lambda r: r.created_at, reverse=True)
    if last is not None:
        rows = rows[:last]
    rows.reverse()
    return rows


def _latest(conn: sa.Connection, table: sa.Table, columns: list[Any], prediction_ids: list[str]) -> dict[str, sa.Row]:
    """{prediction id: its latest row of `table` (the highest id)}, for these ids only: lookups on
    the prediction_id index, a chunk of ids at a time (a prediction has one row or a few)."""
    t = table.c
    out: dict[str, sa.Row] = {}
    for chunk in _chunks(prediction_ids, _WINDOW_CHUNK):
        for r in conn.execute(sa.select(t.prediction_id, t.id, *columns).where(t.prediction_id.in_(chunk))):
            if r.prediction_id not in out or r.id > out[r.prediction_id].id:
                out[r.prediction_id] = r
    return out


def read_predictions(
    url: str,
    model_name: str | None = None,
    since: dt.datetime | None = None,
    last: int | None = None,
    ids: Sequence[str] | None = None,
):
    """A window of the log as a DataFrame, newest last: one row per prediction with its latest
    feedback label (`label`, NaN if none) and the shadow teacher's class and probabilities if scored.

    `inputs` holds each row as stored: a list of numbers for an array model (images), a record
    (dict: the original column names, None for a missing value) for a table model; probabilities
    stay as lists; `slice_<name>` columns are expanded.
    The cost follows the window, not the log: its rows come off the (model_name, created_at) index
    (a read without `model_name` scans the table), their latest label and shadow score from lookups
    by prediction id. A stored value that cannot be decoded raises `StoredValueError` (a ValueError)
    naming its table, column and row.
    """
    import pandas as pd

    if last is not None and last < 0:
        raise ValueError(f"last must be at least 0, not {last}")
    engine = open_store(url, create=False)
    if since is not None and since.tzinfo is not None:  # stored times are naive UTC
        since = since.astimezone(dt.UTC).replace(tzinfo=None)
    try:
        with engine.connect() as conn:
            rows = _window_rows(conn, model_name, since, last, ids)
            pids = [r.id for r in rows]
            labels = _latest(conn, feedback, [feedback.c.label], pids)
            teacher_probs = sa.cast(shadow.c.probabilities, sa.Text).label("probabilities")
            scores = _latest(conn, shadow, [shadow.c.predicted_class, teacher_probs, shadow.c.teacher_uri], pids)
    finally:
        engine.dispose()
    if not rows:
        return pd.DataFrame()
    records = []
    for r in rows:
        record = r._asdict()
        for key in _JSON_TEXT:
            record[key] = _decode(record[key], predictions.name, key, r.id)
        label, score = labels.get(r.id), scores.get(r.id)
        record["label"] = None if label is None else label.label
        record["teacher_class"] = None if score is None else score.predicted_class
        record["teacher_probabilities"] = (
            None if score is None else _decode(score.probabilities, shadow.name, "probabilities", r.id, score.id)
        )
        record["teacher_uri"] = None if score is None else score.teacher_uri
        records.append(record)
    _check_inputs([rec["inputs"] for rec in records], pids)
    _check_numbers([rec["probabilities"] for rec in records], predictions.name, "probabilities", pids)
    scored = [rec for rec in records if rec["teacher_probabilities"] is not None]
    _check_numbers(
        [rec["teacher_probabilities"] for rec in scored],
        shadow.name,
        "probabilities",
        [rec["id"] for rec in scored],
        [scores[rec["id"]].id for rec in scored],
    )
    frame = pd.DataFrame(records, columns=sorted(records[0]))  # the columns in the order they always had
    slices = pd.json_normalize(frame.pop("slices").tolist()).add_prefix("slice_")
    return pd.concat([frame, slices.set_index(frame.index)], axis=1)
