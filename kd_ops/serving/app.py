"""`kd-ops serve`: the champion student over HTTP (FastAPI on uvicorn), every answer in the prediction log.

Request path: check the Host header (400 unless it names the bound host, an --allowed-host, or
on a loopback bind a loopback name: DNS rebinding), read the body (bounded), refuse anything not
declared application/json (415: a web page can post text/plain and forms cross-origin without a
CORS preflight), validate it with pydantic (strict numbers, finite, one message per bad field, at
most 20 listed), run the model, wait for the log commit, answer. Nothing refused is logged. The
response goes out only after the commit, so an answered prediction is stored even if the process
is killed the next instant. The model is picked up once per request: when the alias watcher
swaps in a new version, requests already running finish on the old one and are logged under it.

Two kinds of served version: a model of rows takes float32 feature rows (`rows`) and answers
class indices; a kd-ops table model takes records keyed by its original columns (`records`, and
MLflow's four scoring formats on /invocations), every value checked against its column's kind
(a refusal names record and column, `records[3].distance`), encodes them with the version's
schema, answers the user's labels ("Yes", true) and logs each record as the client sent it.

Layout: the routes are module-level functions on `router`; each gets the server's `ServerState`
injected (`ServerStateDep`, read from `app.state.kd_ops`). `create_app(state)` only builds the
app around them: title and version, lifespan (the alias watcher, closing the log), the Host
middleware, the error handler, and the OpenAPI document carrying the served version's row width
and class count. With metrics on (the default; `--no-metrics` off) it also adds `GET /metrics`
(`metrics_router`) and the middleware counting every request (`kd_ops.serving.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from kd_ops.core.errors import ConfigError
from kd_ops.data.tables import close_matches
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.feedback import REQUEST_ID_PATTERN, ReusedRequestId, feedback_job, replayed, request_digest
from kd_ops.prediction_log.protocol import prediction_batch
from kd_ops.prediction_log.store import (
    LogError,
    UnknownPredictions,
    feedback,
    new_id,
    predictions,
)
from kd_ops.serving.hosts import LOOPBACK_NAMES, HostGuard
from kd_ops.serving.metrics import MetricsMiddleware, ServeMetrics, count_rows
from kd_ops.serving.schemas import (
    _FEEDBACK,
    _INVOCATIONS,
    _PREDICT,
    MAX_ERRORS,
    ROWS,
    SLICE_NAME,
    ErrorBody,
    FeedbackResponse,
    Health,
    InvocationsRequest,
    InvocationsResponse,
    ModelInfo,
    PredictResponse,
    RequestError,
    Slices,
    _check,
    _json_response,
    _parse,
)
from kd_ops.serving.served_model import ServedModel
from kd_ops.serving.state import ServerState, masked

log = logging.getLogger(__name__)


class Unavailable(BaseModel):
    """The prediction log refused the write: nothing was served or stored."""

    detail: str


def _check_json(request: Request) -> None:
    """415 unless the body is declared `application/json` (a `charset=utf-8` parameter allowed).
    A browser sends text/plain and form bodies cross-origin without asking (no CORS preflight):
    refusing them keeps any web page the user opens from posting to a server on their machine."""
    raw = request.headers.get("content-type")
    if raw is None:
        raise RequestError(415, "Content-Type", "Content-Type: missing; send the body as application/json")
    media, _, params = raw.partition(";")
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    if media.strip().lower() != "application/json":
        raise RequestError(415, "Content-Type", f"Content-Type: {shown!r} is not application/json")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise RequestError(415, "Content-Type", f"Content-Type: {shown!r}: JSON is read as UTF-8 only")


# -- the app ----------------------------------------------------------------------------------
OFFLOAD_VALUES = 1 << 16  # batches with more feature values than this are scored in a worker thread
DRAIN_MAX_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read and dropped, so the client gets the 413
FLOAT32_MAX = float(np.finfo(np.float32).max)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 naming the limit. An over-limit body is drained (up to DRAIN_MAX_BYTES) rather
    than left unread: closing a socket with unread bytes resets it and the client never sees the answer."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max(limit, DRAIN_MAX_BYTES):
        raise RequestError(413, "body", f"body: {declared} bytes is over the limit of {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > max(limit, DRAIN_MAX_BYTES):
            break
    if size > limit:
        raise RequestError(413, "body", f"body: {size} bytes is over the limit of {limit} (--max-body-bytes)")
    return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> bytes:
    """The body (413 over the limit), read whole before a 415 for anything not declared JSON."""
    body = await _read_body(request, limit)
    _check_json(request)
    return body


def _row_slices(given_slices: Slices | list[Slices] | None, served: ServedModel, x: np.ndarray) -> list[dict[str, str]]:
    """The slices of each row: those given (one dict for the batch, or one per row) and those the
    version's slicer computes from the row; 422 when a given name is one the server computes."""
    n = len(x)
    if given_slices is None:
        given: list[dict[str, str]] = [{}] * n
    elif isinstance(given_slices, dict):
        given = [given_slices] * n
    else:
        if len(given_slices) != n:
            raise RequestError(
                422, "slices", f"slices: {len(given_slices)} entries for {n} rows (one per row, or one dict)"
            )
        given = given_slices
    if served.slicer is None:
        return [dict(g) for g in given]
    derived = served.slicer.compute(x)
    for i, g in enumerate(given):
        clash = sorted(set(g) & set(derived))
        if clash:
            where = "slices" if isinstance(given_slices, dict) else f"slices[{i}]"
            raise RequestError(422, f"{where}.{clash[0]}", f"{where}.{clash[0]}: computed by the server from the row")
    return [{**g, **{k: str(v[i]) for k, v in derived.items()}} for i, g in enumerate(given)]


def _features(rows: list[list[float]], served: ServedModel, where: str = "rows") -> np.ndarray:
    """float32 rows of the model's width; 422 naming `where[i]` (or `where[i][j]`) otherwise."""
    for i, row in enumerate(rows):
        if len(row) != served.n_features:
            raise RequestError(
                422,
                f"{where}[{i}]",
                f"{where}[{i}]: {len(row)} values, but {served.name} v{served.version} takes {served.n_features}"
                " features",
            )
    try:
        x = np.asarray(rows, dtype=np.float32)
    except OverflowError:  # an integer beyond any float: pydantic lets big ints through as numbers
        i, j = next((i, j) for i, row in enumerate(rows) for j, v in enumerate(row) if abs(v) > FLOAT32_MAX)
        raise RequestError(422, f"{where}[{i}][{j}]", f"{where}[{i}][{j}]: beyond float32's range") from None
    if not np.isfinite(x).all():  # finite doubles beyond float32's range
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise RequestError(422, f"{where}[{i}][{j}]", f"{where}[{i}][{j}]: {rows[i][j]} is beyond float32's range")
    return x


# -- a table model's records -------------------------------------------------------------------
# A table model takes records keyed by its original columns. Every value is checked against its
# column's kind here, before pandas sees it, so a refusal names the record and the column the way
# the client wrote them (`records[3].distance`, `dataframe_split.data[3][7]`); what the schema's
# own encoding refuses after that (it should be nothing) is mapped to the same kind of field.
INT64_LIMIT = 1 << 63
KIND_VALUES = {
    "numeric": "a number or null",
    "boolean": "true, false or null",
    "categorical": "a string (or number, or boolean) or null",
    "text": "a string or null",
}


def _shown(value: Any) -> str:
    """A client's value as JSON writes it (true, null, "abc"), cut to 40 characters for a message."""
    try:
        text = orjson.dumps(value).decode() if value is None or isinstance(value, (bool, int, float, str)) else None
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        text = None
    text = text if text is not None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value_problem(value: Any, kind: str) -> str | None:
    """Why `value` (parsed JSON) cannot stand in a column of `kind`; None if it can."""
    if value is None:
        return None  # missing: every kind takes it
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} is not a column value; send {KIND_VALUES[kind]}"
    if isinstance(value, bool):
        return None if kind not in ("numeric", "text") else f"{_shown(value)} is a boolean; send {KIND_VALUES[kind]}"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "not a finite number"
        if isinstance(value, int) and abs(value) >= INT64_LIMIT:
            return f"{_shown(value)} is an integer beyond 64 bits"
        if abs(value) > FLOAT32_MAX:
            return f"{_shown(value)} is beyond float32's range"
        return None if kind not in ("boolean", "text") else f"{_shown(value)} is a number; send {KIND_VALUES[kind]}"
    if isinstance(value, str):
        return None if kind in ("categorical", "text") else f"{_shown(value)} is text; send {KIND_VALUES[kind]}"
    return f"{_shown(value)} is not a JSON value"


class TableInput:
    """A table request's records (dicts keyed by column, as the client sent them or as built from
    its rows) and how each value is named in errors: `base[i].column`, or `base[i][j]` for a row
    given as a list (`positions[i]` its column order), or `dataframe_split.data[i][j]`."""

    def __init__(self, base: str, records: list[dict[str, Any]], positions: list[list[str] | None]):
        self.base, self.records, self.positions = base, records, positions

    def field(self, i: int, column: str) -> str:
        order = self.positions[i]
        return f"{self.base}[{i}].{column}" if order is None else f"{self.base}[{i}][{order.index(column)}]"


def _records_input(items: list[Any], base: str, served: ServedModel) -> TableInput:
    """`records` / `dataframe_records` / `inputs` / `instances` of a table: each item a record
    (object keyed by column) or, for `inputs` and `instances`, a row of values in the signature's
    column order (as MLflow's scoring server reads a list for a model with named columns)."""
    schema = served.schema
    assert schema is not None
    names = list(schema.names)
    wanted = set(names)
    records: list[dict[str, Any]] = []
    positions: list[list[str] | None] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            for column in names:
                if column not in item:
                    others = [k for k in item if k not in wanted]
                    raise RequestError(
                        422,
                        f"{base}[{i}].{column}",
                        f"{base}[{i}].{column}: column {column!r} is missing{close_matches(column, others)};"
                        " send null for a missing value",
                    )
            for key in item:
                if key not in wanted:
                    raise RequestError(
                        422,
                        f"{base}[{i}].{key}",
                        f"{base}[{i}].{key}: unknown column {key!r}{close_matches(key, names)}; {served.name}"
                        f" v{served.version} takes {names[:30]}",
                    )
            records.append(item)
            positions.append(None)
        elif isinstance(item, list) and base in ("inputs", "instances"):
            if len(item) != len(names):
                raise RequestError(
                    422,
                    f"{base}[{i}]",
                    f"{base}[{i}]: {len(item)} values, but {served.name} v{served.version} takes {len(names)}"
                    f" columns, in this order: {names[:30]}",
                )
            records.append(dict(zip(names, item)))
            positions.append(names)
        else:
            what = "an object keyed by column" + (", or a list of values in column order" if base != "records" else "")
            raise RequestError(422, f"{base}[{i}]", f"{base}[{i}]: not a record: send {what}")
    return TableInput(base, records, positions)


def _split_input(split: Any, served: ServedModel) -> TableInput:
    """`dataframe_split` of a table: named columns (each of the model's, once, in any order)."""
    schema = served.schema
    assert schema is not None
    names = list(schema.names)
    columns = split.columns
    for j, name in enumerate(columns):
        if not isinstance(name, str):
            raise RequestError(
                422, f"dataframe_split.columns[{j}]", f"dataframe_split.columns[{j}]: a table's columns are named"
            )
        if name not in schema.names:
            raise RequestError(
                422,
                f"dataframe_split.columns[{j}]",
                f"dataframe_split.columns[{j}]: unknown column {name!r}{close_matches(name, names)}; {served.name}"
                f" v{served.version} takes {names[:30]}",
            )
    if len(set(columns)) != len(columns):
        raise RequestError(422, "dataframe_split.columns", "dataframe_split.columns: a column is named twice")
    missing = [n for n in names if n not in columns]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RequestError(
            422,
            "dataframe_split.columns",
            f"dataframe_split.columns: column {missing[0]!r} is missing{more}; send null for a missing value",
        )
    for i, row in enumerate(split.data):
        if len(row) != len(columns):
            raise RequestError(
                422,
                f"dataframe_split.data[{i}]",
                f"dataframe_split.data[{i}]: {len(row)} values for {len(columns)} columns",
            )
    records = [dict(zip(columns, row)) for row in split.data]
    return TableInput("dataframe_split.data", records, [list(columns)] * len(records))


def _encode_table(given: TableInput, served: ServedModel) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Check every value against its column's kind, then encode (`schema.encode_counting`,
    strict): the encoded float32 rows the model scores, the slicer cuts and the shadow teacher
    reads, and per text column the rows whose text was truncated to its `max_length`."""
    import pandas as pd

    schema = served.schema
    assert schema is not None
    kinds = [(c.name, c.kind) for c in schema.columns]
    for i, record in enumerate(given.records):
        for name, kind in kinds:
            why = _value_problem(record[name], kind)
            if why is not None:
                field = given.field(i, name)
                raise RequestError(422, field, f"{field}: column {name!r} is {kind}: {why}")
    frame = pd.DataFrame.from_records(given.records, columns=list(schema.names))
    try:
        return schema.encode_counting(frame, where=given.base, strict=True)
    except ConfigError as exc:  # the encoding's own refusal: name the record and column it names
        text = str(exc)
        column = next((n for n in schema.names if f"column {n!r}" in text), None)
        row = re.search(r"\brow (\d+)", text)
        if column is None or row is None:
            raise RequestError(422, given.base, text) from None
        field = given.field(int(row.group(1)), column)
        raise RequestError(422, field, f"{field}: {text.removeprefix(given.base + ': ')}") from None


async def _table_rows(given: TableInput, served: ServedModel, state: ServerState) -> np.ndarray:
    """`_encode_table`, beside the loop for a large batch (pandas and the per-value checks); the
    truncated texts are added to the server's count (`kd_ops_truncated_texts`)."""
    if len(given.records) * max(1, served.n_features) >= OFFLOAD_VALUES:
        x, truncated = await asyncio.to_thread(_encode_table, given, served)
    else:
        x, truncated = _encode_table(given, served)
    for column, cut in truncated.items():
        state.truncated_texts[column] = state.truncated_texts.get(column, 0) + int(cut.sum())
    return x


def _predict_input(req: Any, served: ServedModel) -> tuple[str, Any]:
    """Which of `rows` / `records` a /predict body gives, checked against the served version:
    a table model takes records, any other rows; exactly one of the two."""
    sent = [k for k in ("rows", "records") if k in req.model_fields_set]
    wanted = "records" if served.schema is not None else "rows"
    if len(sent) > 1:
        raise RequestError(422, "body", f"body: give rows or records, not both ({served.name} takes {wanted})")
    if sent and sent[0] != wanted:
        if wanted == "records":
            why = (
                f"{served.name} v{served.version} is a table model: send records, one object per row keyed by"
                f" column ({list(served.schema.names)[:8]}...); see /model"
            )
        else:
            why = f"{served.name} v{served.version} takes feature rows of {served.n_features} numbers, not records"
        raise RequestError(422, sent[0], f"{sent[0]}: {why}")
    value = getattr(req, wanted)
    if value is None:
        what = "one object per row, keyed by column" if wanted == "records" else "feature rows"
        raise RequestError(422, wanted, f"{wanted}: Field required ({what})")
    return wanted, value


INVOCATION_FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")


def _invocation_format(req: InvocationsRequest) -> str:
    given = [k for k in INVOCATION_FORMATS if k in req.model_fields_set]
    if len(given) != 1 or getattr(req, given[0]) is None:
        why = "none" if not given else " and ".join(given) if len(given) > 1 else f"{given[0]}: null"
        raise RequestError(
            422,
            "body",
            "body: give exactly one of inputs, instances, dataframe_split, dataframe_records (MLflow's format),"
            f" got {why}",
        )
    return given[0]


def _invocation_rows(req: InvocationsRequest, key: str, served: ServedModel) -> tuple[list[list[float]], str]:
    """The rows of an MLflow scoring request to a model of rows, and the field they came in."""
    if key in ("inputs", "instances"):
        return _check(ROWS, getattr(req, key), key), key
    if key == "dataframe_records":
        return _records_as_rows(req.dataframe_records, served), key
    split = req.dataframe_split
    data = _check(ROWS, split.data, "dataframe_split", "data")
    for i, name in enumerate(split.columns):
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise RequestError(422, f"dataframe_split.columns[{i}]", f"dataframe_split.columns[{i}]: not a name")
    if len(set(split.columns)) != len(split.columns):
        raise RequestError(422, "dataframe_split.columns", "dataframe_split.columns: a column is named twice")
    if len(split.columns) != served.n_features:
        raise RequestError(
            422,
            "dataframe_split.columns",
            f"dataframe_split.columns: {len(split.columns)} columns, but {served.name} v{served.version} takes"
            f" {served.n_features} features",
        )
    for i, row in enumerate(data):
        if len(row) != len(split.columns):
            raise RequestError(
                422,
                f"dataframe_split.data[{i}]",
                f"dataframe_split.data[{i}]: {len(row)} values for {len(split.columns)} columns",
            )
    return data, "dataframe_split.data"


def _records_as_rows(records: list[dict[str, Any]], served: ServedModel) -> list[list[float]]:
    """`dataframe_records` to a model of rows: every record the same column names (any names, one
    per feature), values in the first record's order, numbers only."""
    keys = list(records[0])
    if len(keys) != served.n_features:
        raise RequestError(
            422,
            "dataframe_records[0]",
            f"dataframe_records[0]: {len(keys)} columns, but {served.name} v{served.version} takes"
            f" {served.n_features} features",
        )
    rows = []
    for i, record in enumerate(records):
        if record.keys() != set(keys):
            raise RequestError(
                422, f"dataframe_records[{i}]", f"dataframe_records[{i}]: not the columns of dataframe_records[0]"
            )
        row = []
        for k in keys:
            v = record[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(
                    422,
                    f"dataframe_records[{i}].{k}",
                    f"dataframe_records[{i}].{k}: not a finite number, got {_shown(v)}",
                )
            row.append(v)
        rows.append(row)
    return rows


def _column_schema(column: Any) -> dict[str, Any]:
    """A table column's values as the handler takes them (`_value_problem`), null for missing."""
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    null = {"type": "null"}
    if column.kind == "numeric":
        return {"anyOf": [number, null], "description": "numeric (null: missing)"}
    if column.kind == "boolean":
        return {"anyOf": [{"type": "boolean"}, null], "description": "boolean (null: missing)"}
    if column.kind == "text":
        return {
            "anyOf": [{"type": "string"}, null],
            "description": f"text (null or empty: no text; beyond {column.max_length} tokens it is truncated)",
        }
    seen = ", ".join(map(repr, column.categories[:20])) + (", ..." if len(column.categories) > 20 else "")
    return {
        "anyOf": [{"type": "string"}, number, {"type": "boolean"}, null],
        "description": f"categorical (null: missing; a value never seen in training counts as missing): {seen}",
    }


def _split_schema(column: dict[str, Any], width: int, data: dict[str, Any]) -> dict[str, Any]:
    """MLflow's `dataframe_split` body: `width` distinct column names of schema `column`, and rows."""
    return {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {
            "columns": {"type": "array", "items": column, "minItems": width, "maxItems": width, "uniqueItems": True},
            "data": data,
            "index": {"type": "array", "description": "as pandas writes it; not used"},
        },
        "additionalProperties": False,
    }


def _request_bodies(n_features: int, n_classes: int, schema: Any = None) -> dict[str, dict[str, Any]]:
    """The OpenAPI request bodies, with the served version's row width and class count, or for a
    table model its columns and classes (the handlers parse the bodies themselves, to bound their
    size and word their errors). Every body the handlers take fits these; they refuse more."""
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    names = {
        "type": "object",
        "patternProperties": {SLICE_NAME: {"type": "string", "maxLength": 256}},
        "additionalProperties": False,
    }
    slices = {
        "anyOf": [names, {"type": "array", "items": names}, {"type": "null"}],
        "description": "labels to cut the traffic by later: one object for the batch, or one per row",
    }

    def one_of(key: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "required": [key], "properties": {key: body}, "additionalProperties": False}

    if schema is None:
        row = {"type": "array", "items": number, "minItems": n_features, "maxItems": n_features}
        rows = {"type": "array", "items": row, "minItems": 1}
        predict = {
            "type": "object",
            "required": ["rows"],
            "properties": {
                "rows": rows | {"description": "feature rows (raw values, as in training)"},
                "slices": slices,
            },
            "additionalProperties": False,
        }
        split = _split_schema({"anyOf": [{"type": "string"}, {"type": "integer"}]}, n_features, rows)
        record = {
            "type": "object",
            "additionalProperties": number,
            "minProperties": n_features,
            "maxProperties": n_features,
            "description": "one number per feature; every record the same names, values in the first one's order",
        }
        invocations = {
            "oneOf": [
                one_of("inputs", rows),
                one_of("instances", rows),
                one_of("dataframe_split", split),
                one_of("dataframe_records", {"type": "array", "items": record, "minItems": 1}),
            ]
        }
        label: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": n_classes - 1}
    else:
        columns = list(schema.columns)
        value = {"anyOf": [{"type": "string"}, number, {"type": "boolean"}, {"type": "null"}]}
        record = {
            "type": "object",
            "required": [c.name for c in columns],
            "properties": {c.name: _column_schema(c) for c in columns},
            "additionalProperties": False,
            "description": "one row: every column of the model, by name (null: missing)",
        }
        records = {"type": "array", "items": record, "minItems": 1}
        row = {
            "type": "array",
            "items": value,
            "minItems": len(columns),
            "maxItems": len(columns),
            "description": "one row as a list: values in the signature's column order (see /model)",
        }
        predict = {
            "type": "object",
            "required": ["records"],
            "properties": {"records": records, "slices": slices},
            "additionalProperties": False,
        }
        data = {"type": "array", "items": {"type": "array", "items": value}, "minItems": 1}
        split = _split_schema({"type": "string"}, len(columns), data)
        items = {"type": "array", "items": {"anyOf": [record, row]}, "minItems": 1}
        invocations = {
            "oneOf": [
                one_of("inputs", items),
                one_of("instances", items),
                one_of("dataframe_split", split),
                one_of("dataframe_records", records),
            ]
        }
        label = {"enum": list(schema.classes), "description": "the true class, as the user's label"}
    feedback = {
        "type": "object",
        "required": ["labels"],
        "properties": {
            "labels": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["prediction_id", "label"],
                    "properties": {
                        "prediction_id": {"type": "string", "minLength": 1, "maxLength": 64},
                        "label": label,
                    },
                    "additionalProperties": False,
                },
                "minItems": 1,
            },
            "request_id": {
                "anyOf": [{"type": "string", "pattern": REQUEST_ID_PATTERN}, {"type": "null"}],
                "description": "idempotency key: a request sent again with the same request_id (and labels)"
                " stores nothing new and answers as the first did, with replayed: true. Without one every"
                " request stores its labels (the latest label of a prediction counts).",
            },
        },
        "additionalProperties": False,
    }
    return {"/predict": predict, "/invocations": invocations, "/feedback": feedback}


def _responses(*codes: int, ok: type[BaseModel] | None = None, ok_doc: str = "") -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=`: every status a route can answer, each with its body's model."""
    docs = {
        400: (ErrorBody, "the Host header names no host this server answers to (--allowed-host)"),
        401: (ErrorBody, "no valid 'Authorization: Bearer <token>'"),
        409: (ErrorBody, "the prediction log is off (--no-log), or request_id was used for other labels"),
        413: (ErrorBody, "body over --max-body-bytes"),
        415: (ErrorBody, "Content-Type is not application/json"),
        422: (ErrorBody, "the body is not valid: detail and field name what"),
        503: (Unavailable, "the prediction log refused the write: nothing was served or stored"),
    }
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": ok_doc or "OK"}
    for code in codes:
        model, doc = docs[code]
        out[code] = {"model": model, "description": doc}
    return out


# -- the server's state, injected into every route ---------------------------------------------
async def server_state(request: Request) -> ServerState:
    """The `ServerState` of the app answering `request` (set by `create_app`). A coroutine, so
    FastAPI calls it on the event loop rather than sending every request through a worker thread."""
    return request.app.state.kd_ops


ServerStateDep = Annotated[ServerState, Depends(server_state)]


# -- request-path helpers -------------------------------------------------------------------------
async def _predict_and_log(
    state: ServerState,
    served: ServedModel,
    x: np.ndarray,
    slices: list[dict[str, str]],
    where: str,
    records: list[dict[str, Any]] | None = None,
) -> tuple[list[str], np.ndarray] | Response:
    """Score `x` and log every row before answering (one place for /predict and /invocations):
    the prediction ids and probabilities, or the 503 to send when the log refused the rows.
    `records`: a table model's records as sent, which the log keeps in place of the encoded `x`."""
    if x.size >= OFFLOAD_VALUES:  # a large batch runs beside the loop, which keeps answering others
        probs = await asyncio.to_thread(served.predict_proba, x)
    else:
        probs = served.predict_proba(x)
    if not np.isfinite(probs).all():
        i = int(np.argwhere(~np.isfinite(probs))[0][0])
        why = f"{where}[{i}]: the model's output is not finite for this row"
        why += " (values far outside the training range?)"
        raise RequestError(422, f"{where}[{i}]", why)
    ids = [new_id() for _ in range(len(x))]
    if state.log is not None:
        batch = prediction_batch(served.name, served.version, x, probs, slices, ids, records=records)
        try:
            await state.log.write_async(predictions, batch)
        except LogError as exc:
            return _json_response({"detail": f"{exc}; the predictions were not served"}, 503)
        if state.shadow is not None:
            state.shadow.offer(served.teacher_uri, ids, x, served.schema, probs)
    state.served_rows += len(ids)
    return ids, probs


def _class_indices(items: list[Any], served: ServedModel) -> list[int]:
    """The class index of each feedback label (what the log stores), checked against the served
    version: for a table model the user's labels ("Yes", true, 3: `schema.label_index`), of the
    JSON type of its classes; for any other model a class index, a strict integer 0..n-1."""
    schema = served.schema
    if schema is None:
        n = served.n_classes
        out = []
        for i, item in enumerate(items):
            v = item.label
            if type(v) is not int or not 0 <= v < n:
                why = f"{_shown(v)} is not a class (an integer 0..{n - 1})"
                raise RequestError(422, f"labels[{i}].label", f"labels[{i}].label: {why}")
            out.append(v)
        return out
    classes = list(schema.classes)
    boolean = all(isinstance(c, bool) for c in classes)

    def refuse(i: int) -> RequestError:
        why = f"{_shown(items[i].label)} is not one of the model's classes {classes[:20]}"
        return RequestError(422, f"labels[{i}].label", f"labels[{i}].label: {why}")

    values = [item.label for item in items]
    for i, v in enumerate(values):
        # The label's JSON type must be its classes' (true is not 1, "1" is not 1): what the
        # OpenAPI's enum of the classes says, so a client learns of a mix-up instead of a wrong label.
        if v is None or isinstance(v, (list, dict)) or isinstance(v, bool) != boolean:
            raise refuse(i)
    try:
        return schema.label_index(values, where="labels").tolist()
    except ConfigError:
        for i, v in enumerate(values):
            try:
                schema.label_index([v])
            except ConfigError:
                raise refuse(i) from None
        raise


def _check_token(request: Request, token: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` (compared in constant time);
    always 401 when the server has no token."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "Authorization", "Authorization: a valid 'Bearer <token>' header is required")


async def _replay(plog: PredictionLog, request_id: str, digest: str, after_refusal: bool = False) -> Response | None:
    """The answer to a /feedback request_id stored before (409 if with other labels), or None."""
    prior = await asyncio.to_thread(plog.find_request, request_id)
    if prior is None:
        return None
    if after_refusal:  # the store refused this copy because another committed first: not a failing store
        plog.refusal_was_replay()
    try:
        stored = replayed(prior, request_id, digest)
    except ReusedRequestId as exc:
        raise RequestError(409, "request_id", str(exc)) from None
    return _json_response({"stored": stored, "replayed": True})


# -- the routes -----------------------------------------------------------------------------------
# The handlers read and parse their bodies themselves (to bound the size and word the errors), so
# FastAPI sees no body parameter: the request bodies in the OpenAPI come from `_request_bodies`.
router = APIRouter()


@router.post(
    "/predict",
    response_model=None,
    responses=_responses(400, 413, 415, 422, 503, ok=PredictResponse, ok_doc="one prediction per row, logged"),
)
async def predict(request: Request, state: ServerStateDep) -> Response:
    """Class, probabilities, prediction id and model version per row; logged before answering.
    A table model takes `records` (objects keyed by column) and answers the user's labels."""
    req = _parse(_PREDICT, await _json_body(request, state.settings.max_body_bytes))
    served = state.current  # one version for the whole request, whatever the watcher does meanwhile
    key, given = _predict_input(req, served)
    count_rows(request, len(given))
    records = None
    if key == "records":
        records = given
        x = await _table_rows(_records_input(given, "records", served), served, state)
    else:
        x = _features(given, served)
    out = await _predict_and_log(state, served, x, _row_slices(req.slices, served, x), key, records)
    if isinstance(out, Response):
        return out
    ids, probs = out
    classes = served.labels(probs.argmax(axis=1))
    return _json_response(
        {
            "model": {"name": served.name, "version": served.version, "alias": served.alias},
            "predictions": [
                {"id": ids[i], "class": classes[i], "probabilities": probs[i], "model_version": served.version}
                for i in range(len(ids))
            ],
        }
    )


@router.post(
    "/invocations",
    response_model=None,
    responses=_responses(
        400, 413, 415, 422, 503, ok=InvocationsResponse, ok_doc="class, probabilities and prediction id per row, logged"
    ),
)
async def invocations(request: Request, state: ServerStateDep) -> Response:
    """MLflow's scoring protocol (`mlflow models serve`) over the served version, in its four
    formats: `inputs` or `instances` (rows; for a table model records, or rows of values in the
    signature's column order), `dataframe_split` (columns and rows), `dataframe_records` (one
    object per row). Out: per row the class (a table's label), the probabilities and the
    prediction id; every row logged as /predict logs it."""
    req = _parse(_INVOCATIONS, await _json_body(request, state.settings.max_body_bytes))
    served = state.current
    key = _invocation_format(req)
    count_rows(request, len(req.dataframe_split.data) if key == "dataframe_split" else len(getattr(req, key)))
    records = None
    if served.schema is not None:
        if key == "dataframe_split":
            given = _split_input(req.dataframe_split, served)
        else:
            given = _records_input(getattr(req, key), key, served)
        x = await _table_rows(given, served, state)
        records, where = given.records, given.base
    else:
        rows, where = _invocation_rows(req, key, served)
        x = _features(rows, served, where)
    out = await _predict_and_log(state, served, x, _row_slices(None, served, x), where, records)
    if isinstance(out, Response):
        return out
    ids, probs = out
    classes = served.labels(probs.argmax(axis=1))
    return _json_response(
        {
            "predictions": [
                {"class": classes[i], "probabilities": probs[i], "prediction_id": ids[i]} for i in range(len(ids))
            ],
            "prediction_ids": ids,
        }
    )


@router.post(
    "/feedback",
    response_model=None,
    responses=_responses(
        400, 401, 409, 413, 415, 422, 503, ok=FeedbackResponse, ok_doc="every label stored (or replayed)"
    ),
)
async def post_feedback(request: Request, state: ServerStateDep) -> Response:
    """True labels for earlier predictions (Authorization: Bearer TOKEN); all stored or none.
    With `request_id`, a replay of the request stores nothing new and answers as the first did."""
    body = await _json_body(request, state.settings.max_body_bytes)  # read first: a 401 then reaches the client
    _check_token(request, state.settings.token)
    req = _parse(_FEEDBACK, body)
    count_rows(request, len(req.labels))
    if state.log is None:
        raise RequestError(409, "labels", "labels: the prediction log is off (--no-log), so no prediction can be found")
    plog = state.log
    labels = list(zip([x.prediction_id for x in req.labels], _class_indices(req.labels, state.current)))
    digest = request_digest(labels)
    if req.request_id is not None and (answer := await _replay(plog, req.request_id, digest)) is not None:
        return answer
    missing = await asyncio.to_thread(plog.missing, [pid for pid, _ in labels])
    if missing:
        exc = UnknownPredictions(missing)
        errors = [
            {"field": f"labels[{j}].prediction_id", "message": "unknown prediction id"}
            for j, _ in exc.missing[:MAX_ERRORS]
        ]
        field = errors[0]["field"]
        raise RequestError(422, field, str(exc), errors, {"unknown_ids": len(missing)})
    try:
        await plog.write_async(feedback, feedback_job(labels, req.request_id))
    except LogError as exc:
        # A copy of this request (same request_id) committed first: its primary key refused this one.
        if req.request_id is not None:
            try:
                answer = await _replay(plog, req.request_id, digest, after_refusal=True)
            except RequestError:
                raise
            except Exception:  # noqa: BLE001 - the store cannot be read either: the 503 below
                answer = None
            if answer is not None:
                return answer
        return _json_response({"detail": f"{exc}; no label was stored"}, 503)
    return _json_response({"stored": len(labels)})


@router.get(
    "/health",
    response_model=None,
    responses=_responses(400, ok=Health, ok_doc="ok, or degraded (alias watch failing, commits failing)")
    | {503: {"model": Health, "description": "failing: the prediction log writer is gone"}},
)
async def health(state: ServerStateDep) -> Response:
    """200 while predictions can be served: "ok", or "degraded" while the alias watch fails or
    the log's commits fail (with the last error and how many failed in a row; "ok" again after
    a commit that succeeds); 503 "failing" when the log writer is gone."""
    served = state.current
    plog = state.log
    log_ok = plog is None or plog.alive
    commits_failing = plog is not None and plog.failing_commits > 0
    if not log_ok:
        status = "failing"
    elif state.watch_error or commits_failing:
        status = "degraded"
    else:
        status = "ok"
    body: dict[str, Any] = {
        "status": status,
        "model": {"name": served.name, "version": served.version, "alias": served.alias},
        "served_rows": state.served_rows,
        "alias_watch": {
            "interval_s": state.settings.poll_interval_s,
            "last_checked": state.watch_checked,
            "error": state.watch_error,
            "swaps": state.swaps[-10:],
        },
        "log": None
        if plog is None
        else {
            "store": masked(plog.url),
            "rows_written": plog.rows_written,
            "commits": plog.commits,
            "failed_commits": plog.failures,
            "consecutive_failed_commits": plog.failing_commits,
            "last_commit_error": plog.last_commit_error,
            "queued": plog.pending(),
        },
        "shadow": state.shadow.stats() if state.shadow else None,
    }
    return _json_response(body, 200 if log_ok else 503)


@router.get("/model", response_model=None, responses=_responses(400, ok=ModelInfo, ok_doc="the version served"))
async def model(state: ServerStateDep) -> Response:
    """The version being served and its lineage (teacher URI, data fingerprint, config hash, code)."""
    return _json_response(state.current.describe())


# Included by `create_app` only with metrics on: with `--no-metrics`, /metrics is a 404.
metrics_router = APIRouter()


@metrics_router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        # Written out: with a text route, FastAPI would document the JSON error body as text/plain.
        400: {
            "description": "the Host header names no host this server answers to (--allowed-host)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        },
        200: {
            "description": "the Prometheus text format (OpenMetrics when the Accept header asks for it)",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        },
    },
)
async def metrics(request: Request) -> Response:
    """The server's Prometheus metrics (`kd_ops.serving.metrics` lists the series): requests and
    rows by route and status, latency, the served version, alias swaps, the log's queue, commits
    and failures, shadow agreement. No token: it changes nothing, and it shows no input, no token
    and no URL (the Host header guard applies as everywhere)."""
    body, content_type = request.app.state.kd_ops_metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


# -- the app --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Watch the alias while the server runs; at shutdown stop the watcher and close the log."""
    state: ServerState = app.state.kd_ops
    metrics: ServeMetrics | None = getattr(app.state, "kd_ops_metrics", None)
    if metrics is not None and state.log is not None:  # opened before the server starts (`server.serve`)
        state.log.on_commit = metrics.observe_commit
    watcher = asyncio.create_task(state.watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        # Here, not after `serve()` returns: uvicorn re-raises SIGTERM/SIGINT once its shutdown is
        # done. In-flight requests have finished by now; what they logged is committed before exit.
        await state.aclose()


async def _client_error(_request: Request, exc: RequestError) -> Response:
    """A refused request as its JSON error body (401s with the `WWW-Authenticate` FastAPI expects)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _json_response(exc.body(), exc.status, headers)


def _served_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi` for a server: FastAPI's document, with the request bodies of the version being
    served (rebuilt when the alias watcher swaps in a version of another width, class count or
    table schema)."""
    base_openapi = app.openapi
    documents: dict[tuple[Any, ...], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        current = app.state.kd_ops.current
        table = getattr(current, "schema", None)
        columns = (
            None if table is None else (tuple((c.name, c.kind, c.categories) for c in table.columns), table.classes)
        )
        key = (current.n_features, current.n_classes, columns)
        if key not in documents:
            doc = copy.deepcopy(base_openapi())
            for path, schema in _request_bodies(current.n_features, current.n_classes, table).items():
                body = {"required": True, "content": {"application/json": {"schema": schema}}}
                doc["paths"][path]["post"]["requestBody"] = body
            documents.clear()
            documents[key] = doc
        return documents[key]

    return openapi


def create_app(state: ServerState, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The FastAPI app serving `state`: the routes of `router`, with `state` as `app.state.kd_ops`.
    `allowed_hosts`: the Host header names answered (None: any; see `hosts.host_policy`)."""
    s = state.settings
    app = FastAPI(
        title="kd-ops serve",
        version=state.current.version,
        summary=f"{s.name}@{s.alias}: predictions, feedback, health",
        lifespan=lifespan,
    )
    app.state.kd_ops = state
    # A refused Host never reaches a route, so nothing it sent is parsed or logged.
    app.add_middleware(HostGuard, allowed=allowed_hosts, drain_bytes=s.max_body_bytes)
    app.add_exception_handler(RequestError, _client_error)  # type: ignore[arg-type]
    app.include_router(router)
    if s.metrics:
        app.include_router(metrics_router)
        paths = [r.path for r in (*router.routes, *metrics_router.routes)]  # FastAPI's docs: by their route
        app.state.kd_ops_metrics = ServeMetrics(state, paths)
        # Added last, so outermost: requests the Host guard refuses are counted too.
        app.add_middleware(MetricsMiddleware, metrics=app.state.kd_ops_metrics)
    app.openapi = _served_openapi(app)  # type: ignore[method-assign]
    return app
