"""`kd-ops serve`: the champion student over HTTP (FastAPI on uvicorn), every answer in the prediction log.

Request path: check the Host header (400 unless it names the bound host, an --allowed-host, or
on a loopback bind a loopback name: DNS rebinding), read the body (bounded), refuse anything not
declared application/json (415: a web page can post text/plain and forms cross-origin without a
CORS preflight), validate it with pydantic (strict numbers, finite, one message per bad field, at
most 20 listed), run the model, wait for the log commit, answer. Nothing refused is logged. The
response goes out only after the commit, so an answered prediction is stored even if the process
is killed the next instant. The model is picked up once per request: when the alias watcher
swaps in a new version, requests already running finish on the old one and are logged under it.

Layout: the routes are module-level functions on `router`; each gets the server's `ServerState`
injected (`ServerStateDep`, read from `app.state.kd_ops`). `create_app(state)` only builds the
app around them: title and version, lifespan (the alias watcher, closing the log), the Host
middleware, the error handler, and the OpenAPI document carrying the served version's row width
and class count.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel

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
from kd_ops.serving.schemas import (
    _FEEDBACK,
    _INVOCATIONS,
    _PREDICT,
    MAX_ERRORS,
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
    x = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(x).all():  # finite doubles beyond float32's range
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise RequestError(422, f"{where}[{i}][{j}]", f"{where}[{i}][{j}]: {rows[i][j]} is beyond float32's range")
    return x


def _invocation_rows(req: InvocationsRequest, served: ServedModel) -> tuple[list[list[float]], str]:
    """The rows of an MLflow scoring request, and the field they came in (for messages)."""
    given = [k for k in ("inputs", "instances", "dataframe_split") if getattr(req, k) is not None]
    if len(given) != 1:
        why = "none" if not given else " and ".join(given)
        raise RequestError(
            422, "body", f"body: give exactly one of inputs, instances, dataframe_split (MLflow's format), got {why}"
        )
    if given[0] != "dataframe_split":
        return getattr(req, given[0]), given[0]
    split = req.dataframe_split
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
    for i, row in enumerate(split.data):
        if len(row) != len(split.columns):
            raise RequestError(
                422,
                f"dataframe_split.data[{i}]",
                f"dataframe_split.data[{i}]: {len(row)} values for {len(split.columns)} columns",
            )
    return split.data, "dataframe_split.data"


def _request_bodies(n_features: int, n_classes: int) -> dict[str, dict[str, Any]]:
    """The OpenAPI request bodies, with the served version's row width and class count (the handlers
    parse the bodies themselves, to bound their size and word their errors)."""
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    row = {"type": "array", "items": number, "minItems": n_features, "maxItems": n_features}
    rows = {"type": "array", "items": row, "minItems": 1}
    names = {
        "type": "object",
        "patternProperties": {SLICE_NAME: {"type": "string", "maxLength": 256}},
        "additionalProperties": False,
    }
    predict = {
        "type": "object",
        "required": ["rows"],
        "properties": {
            "rows": rows | {"description": "feature rows (raw values, as in training)"},
            "slices": {
                "anyOf": [names, {"type": "array", "items": names}, {"type": "null"}],
                "description": "labels to cut the traffic by later: one object for the batch, or one per row",
            },
        },
        "additionalProperties": False,
    }

    def one_of(key: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "required": [key], "properties": {key: schema}, "additionalProperties": False}

    column = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    split = {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {
            "columns": {
                "type": "array",
                "items": column,
                "minItems": n_features,
                "maxItems": n_features,
                "uniqueItems": True,
            },
            "data": rows,
            "index": {"type": "array", "description": "as pandas writes it; not used"},
        },
        "additionalProperties": False,
    }
    invocations = {"oneOf": [one_of("inputs", rows), one_of("instances", rows), one_of("dataframe_split", split)]}
    label = {
        "type": "object",
        "required": ["prediction_id", "label"],
        "properties": {
            "prediction_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "label": {"type": "integer", "minimum": 0, "maximum": n_classes - 1},
        },
        "additionalProperties": False,
    }
    feedback = {
        "type": "object",
        "required": ["labels"],
        "properties": {
            "labels": {"type": "array", "items": label, "minItems": 1},
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
    state: ServerState, served: ServedModel, x: np.ndarray, slices: list[dict[str, str]], where: str
) -> tuple[list[str], np.ndarray] | Response:
    """Score `x` and log every row before answering (one place for /predict and /invocations):
    the prediction ids and probabilities, or the 503 to send when the log refused the rows."""
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
        batch = prediction_batch(served.name, served.version, x, probs, slices, ids)
        try:
            await state.log.write_async(predictions, batch)
        except LogError as exc:
            return _json_response({"detail": f"{exc}; the predictions were not served"}, 503)
        if state.shadow is not None:
            state.shadow.offer(served.teacher_uri, ids, x)
    state.served_rows += len(ids)
    return ids, probs


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
    """Class, probabilities, prediction id and model version per row; logged before answering."""
    req = _parse(_PREDICT, await _json_body(request, state.settings.max_body_bytes))
    served = state.current  # one version for the whole request, whatever the watcher does meanwhile
    x = _features(req.rows, served)
    out = await _predict_and_log(state, served, x, _row_slices(req.slices, served, x), "rows")
    if isinstance(out, Response):
        return out
    ids, probs = out
    classes = probs.argmax(axis=1).tolist()
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
    responses=_responses(400, 413, 415, 422, 503, ok=InvocationsResponse, ok_doc="class probabilities per row, logged"),
)
async def invocations(request: Request, state: ServerStateDep) -> Response:
    """MLflow's scoring protocol (`mlflow models serve`) over the served version: `inputs`,
    `instances` or `dataframe_split` rows in, `predictions` (class probabilities, as the
    scikit-learn flavour's predict_proba) out; every row logged as /predict logs it."""
    req = _parse(_INVOCATIONS, await _json_body(request, state.settings.max_body_bytes))
    served = state.current
    rows, where = _invocation_rows(req, served)
    x = _features(rows, served, where)
    out = await _predict_and_log(state, served, x, _row_slices(None, served, x), where)
    if isinstance(out, Response):
        return out
    ids, probs = out
    return _json_response({"predictions": probs, "prediction_ids": ids})


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
    if state.log is None:
        raise RequestError(409, "labels", "labels: the prediction log is off (--no-log), so no prediction can be found")
    plog = state.log
    labels = [(x.prediction_id, x.label) for x in req.labels]
    digest = request_digest(labels)
    if req.request_id is not None and (answer := await _replay(plog, req.request_id, digest)) is not None:
        return answer
    n_classes = state.current.n_classes
    for i, item in enumerate(req.labels):
        if item.label >= n_classes:
            raise RequestError(
                422, f"labels[{i}].label", f"labels[{i}].label: {item.label} is not a class (0..{n_classes - 1})"
            )
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


# -- the app --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Watch the alias while the server runs; at shutdown stop the watcher and close the log."""
    state: ServerState = app.state.kd_ops
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
    served (rebuilt when the alias watcher swaps in a version of another width or class count)."""
    base_openapi = app.openapi
    documents: dict[tuple[int, int], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        current = app.state.kd_ops.current
        key = (current.n_features, current.n_classes)
        if key not in documents:
            doc = copy.deepcopy(base_openapi())
            for path, schema in _request_bodies(*key).items():
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
    # Outermost: a refused Host never reaches a route, so nothing it sent is parsed or logged.
    app.add_middleware(HostGuard, allowed=allowed_hosts, drain_bytes=s.max_body_bytes)
    app.add_exception_handler(RequestError, _client_error)  # type: ignore[arg-type]
    app.include_router(router)
    app.openapi = _served_openapi(app)  # type: ignore[method-assign]
    return app
