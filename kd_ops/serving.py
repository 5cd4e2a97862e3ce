"""`kd-ops serve`: the champion student over HTTP (FastAPI on uvicorn), every answer in the prediction log.

Request path: check the Host header (400 unless it names the bound host, an --allowed-host, or
on a loopback bind a loopback name: DNS rebinding), read the body (bounded), refuse anything not
declared application/json (415: a web page can post text/plain and forms cross-origin without a
CORS preflight), validate it with pydantic (strict numbers, finite, one message per bad field, at
most 20 listed), run the model, wait for the log commit, answer. Nothing refused is logged. The
response goes out only after the commit, so an answered prediction is stored even if the process
is killed the next instant. The model is picked up once per request: when the alias watcher
swaps in a new version, requests already running finish on the old one and are logged under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, TypeAdapter, ValidationError

from kd_ops.config import ConfigError, first_line
from kd_ops.prediction_log import (
    DEFAULT_STORE,
    REQUEST_ID_PATTERN,
    LogError,
    PredictionLog,
    ReusedRequestId,
    UnknownPredictions,
    feedback,
    feedback_job,
    new_id,
    prediction_batch,
    predictions,
    replayed,
    request_digest,
    utcnow,
)
from kd_ops.served_model import ServedModel, load_version, resolve_alias
from kd_ops.shadow import ShadowScorer

log = logging.getLogger(__name__)

TOKEN_ENV = "KD_OPS_TOKEN"
RELOAD_AFTER_S = 300.0  # a promoted version that failed to load is tried again after this long
DEFAULT_TOKEN_FILE = ".kd-ops/serve-token"

# -- request bodies ---------------------------------------------------------------------------
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # no "1.5" strings, no bools, no NaN/inf
SLICE_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
SliceName = Annotated[str, StringConstraints(pattern=SLICE_NAME)]
SliceValue = Annotated[str, StringConstraints(max_length=256)]
Slices = dict[SliceName, SliceValue]
Rows = Annotated[list[list[Finite]], Field(min_length=1)]


class PredictRequest(BaseModel):
    """`rows`: feature rows (raw values, as in training). `slices`: optional labels to cut the
    traffic by later (one dict for the whole batch, or one per row), e.g. {"site": "berlin"}."""

    model_config = ConfigDict(extra="forbid")
    rows: Rows
    slices: Slices | list[Slices] | None = None


class DataframeSplit(BaseModel):
    """pandas' `to_dict(orient="split")`: column names (one per feature, in the model's order), rows."""

    model_config = ConfigDict(extra="forbid")
    columns: Annotated[list[Any], Field(min_length=1)]  # names (strings or integers), checked by the handler
    data: Rows
    index: list[Any] | None = None  # pandas writes one; not used


class InvocationsRequest(BaseModel):
    """MLflow's scoring protocol (`mlflow models serve`): exactly one of the three."""

    model_config = ConfigDict(extra="forbid")
    inputs: Rows | None = None
    instances: Rows | None = None
    dataframe_split: DataframeSplit | None = None


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    label: Annotated[int, Strict(), Field(ge=0)]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: Annotated[list[Label], Field(min_length=1)]
    request_id: Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)] | None = None


_PREDICT = TypeAdapter(PredictRequest)
_INVOCATIONS = TypeAdapter(InvocationsRequest)
_FEEDBACK = TypeAdapter(FeedbackRequest)

# -- response bodies: documentation (the OpenAPI schema); the handlers write JSON with orjson ---
MAX_ERRORS = 20  # problems listed in an error body; `detail` counts them all


class Problem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every refusal: `detail` is one line that names the field (and counts all problems), `field`
    the first one, `errors` at most 20 problems."""

    detail: str
    field: str
    errors: Annotated[list[Problem], Field(max_length=MAX_ERRORS)]
    unknown_ids: int | None = Field(None, description="/feedback 422: how many of the ids the log does not hold")


class Unavailable(BaseModel):
    """The prediction log refused the write: nothing was served or stored."""

    detail: str


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class RowPrediction(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: str = Field(description="prediction id: send it back with the true label to /feedback")
    class_: int = Field(alias="class")
    probabilities: list[float]
    model_version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[RowPrediction]


class InvocationsResponse(BaseModel):
    predictions: list[list[float]] = Field(description="class probabilities per row, as predict_proba")
    prediction_ids: list[str] = Field(description="kd-ops: the prediction id of each row, for /feedback")


class FeedbackResponse(BaseModel):
    stored: int
    replayed: bool = Field(False, description="true: this request_id was stored before; nothing new was")


class AliasWatch(BaseModel):
    interval_s: float
    last_checked: str | None
    error: str | None
    swaps: list[dict[str, str]]


class LogHealth(BaseModel):
    store: str
    rows_written: int
    commits: int
    failed_commits: int
    consecutive_failed_commits: int
    last_commit_error: str | None
    queued: int


class Health(BaseModel):
    status: Literal["ok", "degraded", "failing"]
    model: ModelRef
    served_rows: int
    alias_watch: AliasWatch
    log: LogHealth | None
    shadow: dict[str, Any] | None


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    uri: str
    run_id: str | None
    source: str | None
    n_features: int
    n_classes: int
    slices: list[str]
    loaded_at: str
    lineage: dict[str, str]


class RequestError(Exception):
    """A client error: HTTP status, the field it concerns (`rows[3][7]`), and what is wrong."""

    def __init__(
        self,
        status: int,
        field: str,
        message: str,
        errors: list[dict[str, str]] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.errors = (errors or [{"field": field, "message": message}])[:MAX_ERRORS]
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "field": self.field, "errors": self.errors, **self.extra}


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _parse(adapter: TypeAdapter, body: bytes) -> Any:
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raw = exc.errors(include_url=False)

        def union_branch(e: dict) -> bool:
            # `slices` (one dict, or a list of dicts) reports a type error for the branch not taken,
            # located at the branch's tag ("list[...]"); errors inside the taken branch are kept.
            last = e["loc"][-1] if e["loc"] else None
            return e["type"] in ("list_type", "dict_type") and isinstance(last, str) and "[" in last

        if len(raw) > 1:
            raw = [e for e in raw if not union_branch(e)] or raw
        errors = []
        for err in raw:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("dict", "list"))))
            got = err.get("input")
            shown = f", got {got!r}" if isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 40 else ""
            errors.append({"field": _field(loc), "message": err["msg"] + shown})
        errors = list({(e["field"], e["message"]): e for e in errors}.values())
        first = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise RequestError(422, first["field"], f"{first['field']}: {first['message']}{more}", errors) from None


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


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


# -- the Host header: which names this server answers to -------------------------------------
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _canonical(name: str) -> str:
    if ":" in name:  # IPv6: one spelling per address ([0:0:0:0:0:0:0:1] is ::1)
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            return name
    return name


def _host_name(value: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lowercase, or None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return None
    name = name.removesuffix(".")
    if not name or any(c.isspace() or c in "/@\\" for c in name):
        return None
    return _canonical(name)


def host_policy(bound: str, allowed: Sequence[str] = ()) -> frozenset[str] | None:
    """The names the Host header may carry (with any port), or None for any: the bound host, every
    `--allowed-host`, and the loopback names when bound to a loopback address. Bound to a wildcard
    (0.0.0.0, ::) the server cannot know its names: `--allowed-host` is required ('*': any)."""
    names = set()
    for entry in allowed:
        name = entry.strip().lower()
        if name == "*":
            return None
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            name = name.removesuffix(".")
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", name):
                raise ConfigError(
                    f"--allowed-host {entry!r}: give a host name or an IP address, without port or scheme"
                ) from None
        names.add(name)
    bound_name = bound.strip().strip("[]").lower()
    if bound_name in WILDCARD_HOSTS:
        if not names:
            raise ConfigError(
                f"--host {bound}: listening on every interface needs the names clients reach it by:"
                " --allowed-host NAME (repeatable; '*' accepts any Host header)"
            )
        return frozenset(names)
    names.add(_canonical(bound_name))
    try:
        loopback = ipaddress.ip_address(bound_name).is_loopback
    except ValueError:
        loopback = bound_name == "localhost"
    return frozenset(names | LOOPBACK_NAMES) if loopback else frozenset(names)


class HostGuard:
    """ASGI middleware: a request whose Host header is not an allowed name gets a 400 before any
    route sees it (DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name)."""

    def __init__(self, app: Any, allowed: frozenset[str] | None, drain_bytes: int):
        self.app, self.allowed, self.drain_bytes = app, allowed, drain_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        hosts = [v for k, v in scope["headers"] if k == b"host"]
        name = _host_name(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
        if name is not None and name in self.allowed:
            return await self.app(scope, receive, send)
        # Read the body first (bounded): closing a socket with unread bytes resets it, and the client
        # would never see the answer.
        size = 0
        while size <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        given = hosts[0].decode("latin-1") if len(hosts) == 1 else f"{len(hosts)} Host headers"
        shown = given if len(given) <= 80 else given[:77] + "..."
        why = f"Host: {shown!r} is not a name this server answers to (kd-ops serve --allowed-host)"
        response = _json_response(RequestError(400, "Host", why).body(), 400)
        await response(scope, receive, send)


# -- server state ------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    name: str
    alias: str = "champion"
    tracking_uri: str = "sqlite:///mlflow.db"
    store: str = DEFAULT_STORE
    log_predictions: bool = True
    poll_interval_s: float = 10.0
    shadow_fraction: float = 0.0
    teacher_uri: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    token: str | None = None
    sqlite_sync: str = "FULL"
    seed: int | None = None
    # --allow-pickle: load versions (and the shadow teacher) whose files run code when loaded.
    allow_pickle: bool = False
    # Host header names answered besides the bound host (and, bound to loopback, the loopback names).
    allowed_hosts: list[str] = field(default_factory=list)

    def check(self) -> None:
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ConfigError(f"--shadow-fraction must be within [0, 1], got {self.shadow_fraction}")
        if self.shadow_fraction > 0 and not self.log_predictions:
            raise ConfigError("--shadow-fraction needs the prediction log (drop --no-log)")
        if self.poll_interval_s <= 0:
            raise ConfigError(f"--poll-interval must be positive, got {self.poll_interval_s}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.sqlite_sync.upper() not in ("FULL", "NORMAL"):
            raise ConfigError(f"--sqlite-sync must be FULL or NORMAL, got {self.sqlite_sync!r}")


@dataclass
class ServerState:
    settings: ServeSettings
    client: Any
    current: ServedModel
    log: PredictionLog | None
    shadow: ShadowScorer | None
    swaps: list[dict[str, str]] = field(default_factory=list)
    watch_checked: str | None = None
    watch_error: str | None = None
    served_rows: int = 0

    @classmethod
    def start(cls, settings: ServeSettings) -> "ServerState":
        """Load the model: what can fail for a reason the user can fix fails here, before the port opens."""
        from kd_ops.tracking import open_tracking

        settings.check()
        # Sets the process's tracking URI too: the model download and the shadow teacher's go there.
        client = open_tracking(settings.tracking_uri, "--tracking-uri")
        if len(settings.name) > 256:
            raise ConfigError("NAME: the prediction log keeps model names of at most 256 characters")
        version = resolve_alias(client, settings.name, settings.alias)
        current = load_version(client, settings.name, version, settings.alias, allow_pickle=settings.allow_pickle)
        if settings.shadow_fraction > 0 and not (settings.teacher_uri or current.teacher_uri):
            raise ConfigError(f"--shadow-fraction: {current.uri} names no teacher in its lineage; pass --teacher URI")
        return cls(settings, client, current, None, None)

    async def open_log(self) -> None:
        """Open the prediction log on the serving loop (its writer answers there); `ConfigError` if it cannot."""
        s = self.settings
        if not s.log_predictions:
            return
        try:
            self.log = await PredictionLog.open(s.store, sqlite_sync=s.sqlite_sync.upper())
        except ValueError as exc:
            raise ConfigError(f"--store: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy / driver / writer errors
            raise ConfigError(f"--store {masked(s.store)}: cannot open it: {first_line(exc)}") from None
        if s.shadow_fraction > 0:
            self.shadow = ShadowScorer(
                s.shadow_fraction, self.log, s.teacher_uri, seed=s.seed, allow_pickle=s.allow_pickle
            )

    async def aclose(self) -> None:
        """Shadow first (it writes to the log), then the log: everything queued is committed."""
        try:
            if self.shadow:
                await asyncio.to_thread(self.shadow.close)
        finally:
            if self.log:
                await self.log.aclose()

    async def watch(self) -> None:
        """Poll the alias; load a newly promoted version beside the old one, then swap in one assignment."""
        s = self.settings
        failed: dict[str, float] = {}  # version -> when it failed to load: not downloaded again every poll
        while True:
            await asyncio.sleep(s.poll_interval_s)
            try:
                version = await asyncio.to_thread(resolve_alias, self.client, s.name, s.alias)
                if version != self.current.version and time.monotonic() - failed.get(version, -1e9) > RELOAD_AFTER_S:
                    try:
                        new = await asyncio.to_thread(
                            load_version, self.client, s.name, version, s.alias, allow_pickle=s.allow_pickle
                        )
                    except Exception:
                        failed[version] = time.monotonic()
                        raise
                    old, self.current = self.current, new
                    self.swaps.append({"from": old.version, "to": new.version, "at": new.loaded_at})
                    del old
                    # The old version was frozen out of the collector at start-up: let it go.
                    gc.unfreeze()
                    gc.collect()
                    gc.freeze()
                    log.warning("serving %s v%s (was v%s): @%s moved", s.name, new.version, old.version, s.alias)
                self.watch_checked, self.watch_error = utcnow().isoformat(timespec="seconds") + "Z", None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded version; report in /health
                self.watch_error = first_line(exc)
                log.warning("alias watch: %s (still serving v%s)", self.watch_error, self.current.version)


def masked(url: str) -> str:
    """A store URL fit for logs: the password replaced."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparseable URL>"


def load_token(token_file: str | os.PathLike | None) -> tuple[str, str]:
    """The feedback token and where it came from: $KD_OPS_TOKEN, else a file (created, mode 0600, if absent)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    path = Path(token_file or DEFAULT_TOKEN_FILE).expanduser()
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"--token-file {path} is empty")
        return token, str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), f"{path} (new)"


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


def _row_slices(
    given_slices: Slices | list[Slices] | None, served: ServedModel, x: np.ndarray
) -> list[dict[str, str]]:
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


def create_app(state: ServerState, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES) -> FastAPI:
    s = state.settings

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
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

    app = FastAPI(
        title="kd-ops serve",
        version=state.current.version,
        summary=f"{s.name}@{s.alias}: predictions, feedback, health",
        lifespan=lifespan,
    )
    # Outermost: a refused Host never reaches a route, so nothing it sent is parsed or logged.
    app.add_middleware(HostGuard, allowed=allowed_hosts, drain_bytes=s.max_body_bytes)

    base_openapi = app.openapi
    documents: dict[tuple[int, int], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the request bodies of the version being served."""
        key = (state.current.n_features, state.current.n_classes)
        if key not in documents:
            doc = copy.deepcopy(base_openapi())
            for path, schema in _request_bodies(*key).items():
                body = {"required": True, "content": {"application/json": {"schema": schema}}}
                doc["paths"][path]["post"]["requestBody"] = body
            documents.clear()
            documents[key] = doc
        return documents[key]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestError)
    async def _client_error(_request: Request, exc: RequestError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _json_response(exc.body(), exc.status, headers)

    async def predict_and_log(
        served: ServedModel, x: np.ndarray, slices: list[dict[str, str]], where: str
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

    @app.post(
        "/predict",
        response_model=None,
        responses=_responses(400, 413, 415, 422, 503, ok=PredictResponse, ok_doc="one prediction per row, logged"),
    )
    async def predict(request: Request) -> Response:
        """Class, probabilities, prediction id and model version per row; logged before answering."""
        req = _parse(_PREDICT, await _json_body(request, s.max_body_bytes))
        served = state.current  # one version for the whole request, whatever the watcher does meanwhile
        x = _features(req.rows, served)
        out = await predict_and_log(served, x, _row_slices(req.slices, served, x), "rows")
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

    @app.post(
        "/invocations",
        response_model=None,
        responses=_responses(
            400, 413, 415, 422, 503, ok=InvocationsResponse, ok_doc="class probabilities per row, logged"
        ),
    )
    async def invocations(request: Request) -> Response:
        """MLflow's scoring protocol (`mlflow models serve`) over the served version: `inputs`,
        `instances` or `dataframe_split` rows in, `predictions` (class probabilities, as the
        scikit-learn flavour's predict_proba) out; every row logged as /predict logs it."""
        req = _parse(_INVOCATIONS, await _json_body(request, s.max_body_bytes))
        served = state.current
        rows, where = _invocation_rows(req, served)
        x = _features(rows, served, where)
        out = await predict_and_log(served, x, _row_slices(None, served, x), where)
        if isinstance(out, Response):
            return out
        ids, probs = out
        return _json_response({"predictions": probs, "prediction_ids": ids})

    @app.post(
        "/feedback",
        response_model=None,
        responses=_responses(
            400, 401, 409, 413, 415, 422, 503, ok=FeedbackResponse, ok_doc="every label stored (or replayed)"
        ),
    )
    async def post_feedback(request: Request) -> Response:
        """True labels for earlier predictions (Authorization: Bearer TOKEN); all stored or none.
        With `request_id`, a replay of the request stores nothing new and answers as the first did."""
        body = await _json_body(request, s.max_body_bytes)  # read first: a 401 then reaches the client
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if (
            scheme.lower() != "bearer"
            or not s.token
            or not hmac.compare_digest(given.strip().encode(), s.token.encode())
        ):
            raise RequestError(401, "Authorization", "Authorization: a valid 'Bearer <token>' header is required")
        req = _parse(_FEEDBACK, body)
        if state.log is None:
            raise RequestError(
                409, "labels", "labels: the prediction log is off (--no-log), so no prediction can be found"
            )
        plog = state.log
        labels = [(x.prediction_id, x.label) for x in req.labels]
        digest = request_digest(labels)

        async def replay(after_refusal: bool = False) -> Response | None:
            """The answer to a request_id stored before (409 if with other labels), or None."""
            prior = await asyncio.to_thread(plog.find_request, req.request_id)
            if prior is None:
                return None
            if after_refusal:  # the store refused this copy because another committed first: not a failing store
                plog.refusal_was_replay()
            try:
                stored = replayed(prior, req.request_id, digest)
            except ReusedRequestId as exc:
                raise RequestError(409, "request_id", str(exc)) from None
            return _json_response({"stored": stored, "replayed": True})

        if req.request_id is not None and (answer := await replay()) is not None:
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
                    answer = await replay(after_refusal=True)
                except RequestError:
                    raise
                except Exception:  # noqa: BLE001 - the store cannot be read either: the 503 below
                    answer = None
                if answer is not None:
                    return answer
            return _json_response({"detail": f"{exc}; no label was stored"}, 503)
        return _json_response({"stored": len(labels)})

    @app.get(
        "/health",
        response_model=None,
        responses=_responses(400, ok=Health, ok_doc="ok, or degraded (alias watch failing, commits failing)")
        | {503: {"model": Health, "description": "failing: the prediction log writer is gone"}},
    )
    async def health() -> Response:
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
                "interval_s": s.poll_interval_s,
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

    @app.get("/model", response_model=None, responses=_responses(400, ok=ModelInfo, ok_doc="the version served"))
    async def model() -> Response:
        """The version being served and its lineage (teacher URI, data fingerprint, config hash, code)."""
        return _json_response(state.current.describe())

    return app


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Load the model and open the store (errors raise `ConfigError` before the port opens), then run
    until SIGINT/SIGTERM; in-flight requests finish and every answered prediction is committed."""
    import uvicorn

    allowed = host_policy(host, settings.allowed_hosts)  # first: a wildcard --host without names fails at once
    state = ServerState.start(settings)
    config = uvicorn.Config(
        create_app(state, allowed),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )

    async def main() -> None:
        await state.open_log()
        try:
            served = state.current
            print(
                f"kd-ops: serving {served.name} v{served.version} (@{served.alias}) on http://{host}:{port}"
                f"\n  prediction log: {masked(settings.store) if state.log else 'off'}"
                f"\n  Host header: {'any' if allowed is None else ', '.join(sorted(allowed))} (any port)"
                f"\n  alias checked every {settings.poll_interval_s:g} s;"
                f" shadow teacher on {settings.shadow_fraction:.0%} of requests",
                flush=True,
            )
            # Everything loaded so far (torch, MLflow, the model) lives as long as the server: keep it
            # out of the collector's full passes, which otherwise pause every request for ~0.3 s.
            gc.collect()
            gc.freeze()
            await uvicorn.Server(config).serve()
        finally:
            await state.aclose()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
