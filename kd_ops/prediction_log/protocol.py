"""The frames between the server and its writer process: a 4-byte length, then an orjson body."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import orjson

from kd_ops.prediction_log.store import new_id, predictions, utcnow

# -- the socket protocol between the server and its writer process (see kd_ops.prediction_log.writer) ----
CLOSE = -1  # job id of the frame that asks the writer to commit what it holds and exit
_HEADER = 4


def encode(message: Any) -> bytes:
    """One frame: 4-byte little-endian length, then the orjson body (numpy arrays written directly)."""
    body = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)
    return len(body).to_bytes(_HEADER, "little") + body


def decode_frames(buf: bytearray) -> list[Any]:
    """Every complete frame at the start of `buf` (removed from it); a partial one stays. Frames
    are parsed in place and the buffer shifted once, not once per frame."""
    out = []
    pos, size = 0, len(buf)
    view = memoryview(buf)
    try:
        while size - pos >= _HEADER:
            end = pos + _HEADER + int.from_bytes(view[pos : pos + _HEADER], "little")
            if end > size:
                break
            out.append(orjson.loads(view[pos + _HEADER : end]))
            pos = end
    finally:
        view.release()
    if pos:
        del buf[:pos]
    return out


# -- predictions in their stored form ---------------------------------------------------------
# What the server sends the writer for a prediction write: each row's values in the table's
# column order, already in the form the store keeps (`stored_predictions`), so the writer binds
# them as they are: no per-row dicts, no per-value Python, one `executemany` (or multi-row INSERT).
PREDICTION_COLUMNS = tuple(c.key for c in predictions.columns)
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def stored_time(t: dt.datetime) -> str:
    """A naive UTC datetime as SQLAlchemy's SQLite DateTime writes it (`2026-01-02 03:04:05.000006`,
    always six digits of microseconds); PostgreSQL parses the same text into the same timestamp."""
    return (t if t.tzinfo is None else t.replace(tzinfo=None)).isoformat(" ", "microseconds")


def _records(inputs: Any) -> bool:
    """True when a batch's inputs are a table's raw records (JSON objects), not a float matrix."""
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and isinstance(inputs[0], dict)


def stored_predictions(batch: dict[str, Any]) -> list[list[Any]]:
    """The rows of one `prediction_batch`, each a list in PREDICTION_COLUMNS order, as the store
    keeps them: JSON columns as the text the engine's `json_serializer` (`_json`) writes, the time
    as `stored_time`, class and confidence from the float32 probabilities. The same stored values
    as SQLAlchemy writes for `prediction_rows(batch)`, at a fraction of the cost: the JSON is
    written in C (orjson) and the rest is one list per row.

    `inputs` is a float matrix (a model of rows: each row stored as float32) or, for a table
    model, a list of records (dicts), each stored as the JSON object the client sent, nulls kept:
    the log keeps what was asked, so a reader can re-encode it with any later schema."""
    probs = np.ascontiguousarray(batch["probabilities"], dtype=np.float32)
    raw = batch["inputs"]
    records = _records(raw)
    x = raw if records else np.ascontiguousarray(raw, dtype=np.float32)
    ids, slices = batch["ids"], batch["slices"]
    shape = f"{len(x)} records" if records else f"inputs {x.shape}"
    if probs.ndim != 2 or (not records and x.ndim != 2) or not (len(ids) == len(x) == len(probs) == len(slices)):
        raise ValueError(
            f"a prediction batch needs one id, input row, probability row and slices dict per row: got {len(ids)}"
            f" ids, {shape}, probabilities {probs.shape}, {len(slices)} slices"
        )
    classes, confidence = probs.argmax(axis=1).tolist(), probs.max(axis=1).tolist()
    created = stored_time(batch["created_at"])
    name, version, request_id = batch["model_name"], batch["model_version"], batch["request_id"]
    dumps = orjson.dumps
    return [
        [
            pid,
            created,
            name,
            version,
            request_id,
            i,
            dumps(x[i], option=_NUMPY).decode(),
            dumps(probs[i], option=_NUMPY).decode(),
            classes[i],
            confidence[i],
            dumps(slices[i], option=_NUMPY).decode(),
        ]
        for i, pid in enumerate(ids)
    ]


# A row of a write that belongs to another table than the write's own: the writer inserts it there,
# in the same transaction (so a feedback request's row and its labels commit together, or neither).
ROW_TABLE = "__table__"


def prediction_batch(
    name: str,
    version: str,
    x: np.ndarray,
    probs: np.ndarray,
    slices: list[dict[str, str]],
    ids: list[str] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One answered request, by column: what the server sends the writer. Whole arrays serialise in
    one call (orjson, in C); the writer process spends the per-row Python, not the request loop.

    `records`: a table model's raw records as the client sent them; logged as the inputs in place
    of the encoded rows `x` (which the encoding derives from them, under the version's schema)."""
    if records is not None and len(records) != len(x):
        raise ValueError(f"a prediction batch needs one record per row: got {len(records)} for {len(x)} rows")
    return {
        "ids": ids or [new_id() for _ in range(len(x))],
        "created_at": utcnow(),
        "model_name": name,
        "model_version": version,
        "request_id": new_id(),
        "inputs": records if records is not None else x,
        "probabilities": probs,
        "slices": slices,
    }


def prediction_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The log rows of one `prediction_batch` (one request id, one timestamp, one model version)."""
    probs = np.asarray(batch["probabilities"], dtype=np.float32)
    x = batch["inputs"] if _records(batch["inputs"]) else np.asarray(batch["inputs"], dtype=np.float32)
    classes, confidence = probs.argmax(axis=1), probs.max(axis=1)
    common = {k: batch[k] for k in ("created_at", "model_name", "model_version", "request_id")}
    return [
        {
            "id": pid,
            **common,
            "row_index": i,
            "inputs": x[i],
            "probabilities": probs[i],
            "predicted_class": int(classes[i]),
            "confidence": float(confidence[i]),
            "slices": batch["slices"][i],
        }
        for i, pid in enumerate(batch["ids"])
    ]
