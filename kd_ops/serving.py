"""`kd-ops serve`: the champion student over HTTP (FastAPI on uvicorn), every answer in the prediction log.

Request path: read the body (bounded), validate it with pydantic (strict numbers, finite, one
message per bad field), run the model, wait for the log commit, answer. The response goes out
only after the commit, so an answered prediction is stored even if the process is killed the
next instant. The model is picked up once per request: when the alias watcher swaps in a new
version, requests already running finish on the old one and are logged under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, TypeAdapter, ValidationError

from kd_ops.config import ConfigError, first_line
from kd_ops.prediction_log import (
    DEFAULT_STORE,
    LogError,
    PredictionLog,
    UnknownPredictions,
    feedback,
    feedback_rows,
    new_id,
    prediction_batch,
    predictions,
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
SliceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
SliceValue = Annotated[str, StringConstraints(max_length=256)]
Slices = dict[SliceName, SliceValue]


class PredictRequest(BaseModel):
    """`rows`: feature rows (raw values, as in training). `slices`: optional labels to cut the
    traffic by later (one dict for the whole batch, or one per row), e.g. {"site": "berlin"}."""

    model_config = ConfigDict(extra="forbid")
    rows: Annotated[list[list[Finite]], Field(min_length=1)]
    slices: Slices | list[Slices] | None = None


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    label: Annotated[int, Strict(), Field(ge=0)]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: Annotated[list[Label], Field(min_length=1)]


_PREDICT = TypeAdapter(PredictRequest)
_FEEDBACK = TypeAdapter(FeedbackRequest)


class RequestError(Exception):
    """A client error: HTTP status, the field it concerns (`rows[3][7]`), and what is wrong."""

    def __init__(self, status: int, field: str, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.errors = errors or [{"field": field, "message": message}]


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


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the handler parses itself (to bound its size and word its errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


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
        from mlflow.tracking import MlflowClient

        settings.check()
        client = MlflowClient(settings.tracking_uri)
        if len(settings.name) > 256:
            raise ConfigError("NAME: the prediction log keeps model names of at most 256 characters")
        version = resolve_alias(client, settings.name, settings.alias)
        current = load_version(client, settings.name, version, settings.alias)
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
            self.shadow = ShadowScorer(s.shadow_fraction, self.log, s.teacher_uri, seed=s.seed)

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
                        new = await asyncio.to_thread(load_version, self.client, s.name, version, s.alias)
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


def _row_slices(req: PredictRequest, served: ServedModel, x: np.ndarray) -> list[dict[str, str]]:
    n = len(x)
    if req.slices is None:
        given: list[dict[str, str]] = [{}] * n
    elif isinstance(req.slices, dict):
        given = [req.slices] * n
    else:
        if len(req.slices) != n:
            raise RequestError(
                422, "slices", f"slices: {len(req.slices)} entries for {n} rows (one per row, or one dict)"
            )
        given = req.slices
    if served.slicer is None:
        return [dict(g) for g in given]
    derived = served.slicer.compute(x)
    for i, g in enumerate(given):
        clash = sorted(set(g) & set(derived))
        if clash:
            where = "slices" if isinstance(req.slices, dict) else f"slices[{i}]"
            raise RequestError(422, f"{where}.{clash[0]}", f"{where}.{clash[0]}: computed by the server from the row")
    return [{**g, **{k: str(v[i]) for k, v in derived.items()}} for i, g in enumerate(given)]


def _features(req: PredictRequest, served: ServedModel) -> np.ndarray:
    for i, row in enumerate(req.rows):
        if len(row) != served.n_features:
            raise RequestError(
                422,
                f"rows[{i}]",
                f"rows[{i}]: {len(row)} values, but {served.name} v{served.version} takes {served.n_features} features",
            )
    x = np.asarray(req.rows, dtype=np.float32)
    if not np.isfinite(x).all():  # finite doubles beyond float32's range
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise RequestError(422, f"rows[{i}][{j}]", f"rows[{i}][{j}]: {req.rows[i][j]} is beyond float32's range")
    return x


def create_app(state: ServerState) -> FastAPI:
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

    @app.exception_handler(RequestError)
    async def _client_error(_request: Request, exc: RequestError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _json_response({"detail": exc.message, "field": exc.field, "errors": exc.errors}, exc.status, headers)

    @app.post("/predict", openapi_extra=_body_schema(PredictRequest))
    async def predict(request: Request) -> Response:
        """Class, probabilities, prediction id and model version per row; logged before answering."""
        req = _parse(_PREDICT, await _read_body(request, s.max_body_bytes))
        served = state.current  # one version for the whole request, whatever the watcher does meanwhile
        x = _features(req, served)
        slices = _row_slices(req, served, x)
        if x.size >= OFFLOAD_VALUES:  # a large batch runs beside the loop, which keeps answering others
            probs = await asyncio.to_thread(served.predict_proba, x)
        else:
            probs = served.predict_proba(x)
        if not np.isfinite(probs).all():
            i = int(np.argwhere(~np.isfinite(probs))[0][0])
            why = f"rows[{i}]: the model's output is not finite for this row (values far outside the training range?)"
            raise RequestError(422, f"rows[{i}]", why)
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

    @app.post("/feedback", openapi_extra=_body_schema(FeedbackRequest))
    async def post_feedback(request: Request) -> Response:
        """True labels for earlier predictions (Authorization: Bearer TOKEN); all stored or none."""
        body = await _read_body(request, s.max_body_bytes)  # read first: a 401 then reaches the client
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
        n_classes = state.current.n_classes
        for i, item in enumerate(req.labels):
            if item.label >= n_classes:
                raise RequestError(
                    422, f"labels[{i}].label", f"labels[{i}].label: {item.label} is not a class (0..{n_classes - 1})"
                )
        labels = [(x.prediction_id, x.label) for x in req.labels]
        missing = await asyncio.to_thread(state.log.missing, [pid for pid, _ in labels])
        if missing:
            exc = UnknownPredictions(missing)
            i, _ = exc.missing[0]
            errors = [
                {"field": f"labels[{j}].prediction_id", "message": "unknown prediction id"} for j, _ in exc.missing
            ]
            raise RequestError(422, f"labels[{i}].prediction_id", str(exc), errors)
        try:
            await state.log.write_async(feedback, feedback_rows(labels))
        except LogError as exc:
            return _json_response({"detail": f"{exc}; no label was stored"}, 503)
        return _json_response({"stored": len(labels)})

    @app.get("/health")
    async def health() -> Response:
        """200 while predictions can be served and logged; 503 when the log writer is gone."""
        served = state.current
        log_ok = state.log is None or state.log.alive
        body: dict[str, Any] = {
            "status": "ok" if log_ok and not state.watch_error else ("degraded" if log_ok else "failing"),
            "model": {"name": served.name, "version": served.version, "alias": served.alias},
            "served_rows": state.served_rows,
            "alias_watch": {
                "interval_s": s.poll_interval_s,
                "last_checked": state.watch_checked,
                "error": state.watch_error,
                "swaps": state.swaps[-10:],
            },
            "log": None
            if state.log is None
            else {
                "store": masked(state.log.url),
                "rows_written": state.log.rows_written,
                "commits": state.log.commits,
                "failed_commits": state.log.failures,
                "queued": state.log.pending(),
            },
            "shadow": state.shadow.stats() if state.shadow else None,
        }
        return _json_response(body, 200 if log_ok else 503)

    @app.get("/model")
    async def model() -> Response:
        """The version being served and its lineage (teacher URI, data fingerprint, config hash, code)."""
        return _json_response(state.current.describe())

    return app


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Load the model and open the store (errors raise `ConfigError` before the port opens), then run
    until SIGINT/SIGTERM; in-flight requests finish and every answered prediction is committed."""
    import uvicorn

    state = ServerState.start(settings)
    config = uvicorn.Config(
        create_app(state), host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=30
    )

    async def main() -> None:
        await state.open_log()
        try:
            served = state.current
            print(
                f"kd-ops: serving {served.name} v{served.version} (@{served.alias}) on http://{host}:{port}"
                f"\n  prediction log: {masked(settings.store) if state.log else 'off'}"
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
