"""The prediction log: every served prediction, the labels that arrive later, the shadow teacher's view.

Three append-only SQL tables behind SQLAlchemy Core, so the same code writes a SQLite file (WAL
mode, the default) or PostgreSQL when one machine is outgrown. Rows are never updated or deleted:
a label is a new `kd_ops_feedback` row (the latest one counts), a shadow score a new
`kd_ops_shadow` row.

Durability contract: a write resolves only after the transaction holding its rows has committed
(SQLite: `synchronous=FULL`, so the WAL is fsynced), and the server sends a response only after
that. Writes are group-committed by one writer process (`kd_ops.log_writer`): requests that
arrive while a commit is in flight share the next one, so the fsync is paid per batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_STORE = "sqlite:///predictions.db"

metadata = sa.MetaData()

predictions = sa.Table(
    "kd_ops_predictions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # uuid4 hex: unique across server replicas
    sa.Column("created_at", sa.DateTime, nullable=False),  # UTC, naive (SQLite keeps no zone)
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("request_id", sa.String(32), nullable=False),
    sa.Column("row_index", sa.Integer, nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    sa.Column("predicted_class", sa.Integer, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("slices", sa.JSON, nullable=False),
    sa.Index("ix_kd_ops_predictions_model_time", "model_name", "created_at"),
)

feedback = sa.Table(
    "kd_ops_feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey(predictions.c.id), nullable=False, index=True),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("received_at", sa.DateTime, nullable=False),
)

shadow = sa.Table(
    "kd_ops_shadow",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey(predictions.c.id), nullable=False, index=True),
    sa.Column("teacher_uri", sa.String(2048), nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    sa.Column("predicted_class", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)


class LogError(RuntimeError):
    """The store refused a write; the rows of that write are not stored."""


class UnknownPredictions(ValueError):
    """Feedback named prediction ids the log does not hold (`missing` keeps their positions)."""

    def __init__(self, missing: list[tuple[int, str]]):
        self.missing = missing
        shown = ", ".join(f"labels[{i}].prediction_id={pid!r}" for i, pid in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        super().__init__(f"unknown prediction id: {shown}{more}")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def new_id() -> str:
    """128 random bits as 32 hex digits, like uuid4().hex without building a UUID object."""
    return os.urandom(16).hex()


def _json(value: Any) -> str:
    # orjson writes numpy rows directly, float32 in its shortest form (0.1, not 0.10000000149).
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def open_store(url: str, sqlite_sync: str = "FULL", create: bool = True) -> Engine:
    """An engine for `url`; with `create`, the tables are created (else a store without them is an
    error: a mistyped URL must not read as an empty log). SQLite gets WAL, a busy timeout, foreign keys.

    `sqlite_sync="FULL"` fsyncs the WAL at each commit (a committed prediction survives power loss);
    "NORMAL" survives a crash of the process but not of the machine.
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(f"not a SQLAlchemy database URL: {url!r} (e.g. sqlite:///predictions.db)") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in url:
            raise ValueError(f"{url!r} is an in-memory SQLite database: the writer process cannot share it; use a file")
        path = Path(parsed.database).expanduser()
        if not create and not path.exists():
            raise ValueError(f"no prediction log at {url!r}: {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
    # hide_parameters: a failed statement's message must not carry the clients' inputs into logs.
    engine = sa.create_engine(
        url, json_serializer=_json, json_deserializer=orjson.loads, pool_pre_ping=True, hide_parameters=True
    )
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DBAPI connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sqlite_sync}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    if create:
        _create_tables(engine)
    elif not sa.inspect(engine).has_table(predictions.name):
        engine.dispose()
        raise ValueError(f"no prediction log at {url!r}: it has no table {predictions.name}")
    return engine


def _create_tables(engine: Engine, attempts: int = 5) -> None:
    """`create_all`, safe when several replicas open a new store at once: its check-then-create
    is not atomic, and the loser of the race gets "already exists" (SQLite) or a duplicate key in
    the catalogue (PostgreSQL); it checks again and finds the tables."""
    for attempt in range(attempts):
        try:
            metadata.create_all(engine)
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError) as exc:
            text = str(exc.orig if exc.orig is not None else exc).lower()
            if attempt == attempts - 1 or not ("already exists" in text or "duplicate key" in text):
                raise
            time.sleep(0.05 * (attempt + 1))


# -- the socket protocol between the server and its writer process (see kd_ops.log_writer) ----
CLOSE = -1  # job id of the frame that asks the writer to commit what it holds and exit
_HEADER = 4


def encode(message: Any) -> bytes:
    """One frame: 4-byte little-endian length, then the orjson body (numpy arrays written directly)."""
    body = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)
    return len(body).to_bytes(_HEADER, "little") + body


def decode_frames(buf: bytearray) -> list[Any]:
    """Every complete frame at the start of `buf` (removed from it); a partial one stays."""
    out = []
    while len(buf) >= _HEADER:
        n = int.from_bytes(buf[:_HEADER], "little")
        if len(buf) < _HEADER + n:
            break
        out.append(orjson.loads(bytes(buf[_HEADER : _HEADER + n])))
        del buf[: _HEADER + n]
    return out


class _WriterLink(asyncio.Protocol):
    """The parent's end of the socket to the writer process: frames in, `PredictionLog` told."""

    def __init__(self, owner: "PredictionLog"):
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner._buf += data
        for msg in decode_frames(self.owner._buf):
            self.owner._on_frame(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost()


class PredictionLog:
    """The server's handle on the log: writes go to a writer process (`kd_ops.log_writer`) and
    resolve once committed; reads (feedback ids, counts) go straight to the store.

    Writes come from the event loop that opened the log (`write_async`) or from any other thread
    (`submit`, `write`). `open_sync` gives scripts and tests a log with a loop thread of its own.
    """

    MAX_BUFFERED_BYTES = 64 * 1024 * 1024  # unsent rows beyond this: the writer is stuck, refuse more
    COMMIT_TIMEOUT_S = 30.0  # a write not acknowledged by then fails (it may still commit: the safe direction)

    def __init__(self, url: str, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.url = url
        self.engine = engine
        self.rows_written = self.commits = self.failures = 0
        self._loop = loop
        self._proc: subprocess.Popen | None = None
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._ready: asyncio.Future = loop.create_future()  # the writer's first frame
        self._lost: asyncio.Future = loop.create_future()  # the socket closed
        self._pending: dict[int, tuple[asyncio.Future, int]] = {}  # insertion order = oldest first
        self._sent_at: dict[int, float] = {}
        self._sweeper: asyncio.Task | None = None
        self._next_id = 0
        self._closed = False
        self._gone: str | None = None  # why the writer stopped, if it did
        self._own_thread: threading.Thread | None = None

    # -- opening and closing -----------------------------------------------------------
    @classmethod
    async def open(
        cls, url: str = DEFAULT_STORE, sqlite_sync: str = "FULL", commit_delay_s: float = 0.0005
    ) -> "PredictionLog":
        """Create the tables and start the writer; raises ValueError (bad URL) or `LogError`."""
        engine = await asyncio.to_thread(open_store, url, sqlite_sync)
        log_ = cls(url, engine, asyncio.get_running_loop())
        try:
            await log_._start(sqlite_sync, commit_delay_s)
        except BaseException:
            await log_.aclose()
            raise
        return log_

    @classmethod
    def open_sync(cls, url: str = DEFAULT_STORE, sqlite_sync: str = "FULL", commit_delay_s: float = 0.0005):
        """A log for code without an event loop: runs one in a daemon thread."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="kd-ops-log-loop", daemon=True)
        thread.start()
        try:
            log_ = asyncio.run_coroutine_threadsafe(cls.open(url, sqlite_sync, commit_delay_s), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            raise
        log_._own_thread = thread
        return log_

    async def _start(self, sqlite_sync: str, commit_delay_s: float) -> None:
        ours, theirs = socket.socketpair()
        # -P and PYTHONPATH: the writer imports the same kd_ops as the server, never one in its cwd.
        here = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "kd_ops.log_writer", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._transport, _ = await self._loop.create_unix_connection(lambda: _WriterLink(self), sock=ours)
        # Settings travel over the socket, not the command line: a store URL may hold a password.
        self._transport.write(encode({"url": self.url, "sqlite_sync": sqlite_sync, "commit_delay_s": commit_delay_s}))
        try:
            first = await asyncio.wait_for(asyncio.shield(self._ready), timeout=120)
        except asyncio.TimeoutError:
            first = {"error": "no answer within 120 s"}
        if "error" in first:
            raise LogError(f"the prediction log writer could not start: {first['error']}")
        self._sweeper = self._loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Fail writes the writer has not acknowledged within COMMIT_TIMEOUT_S (a stuck store), so
        no request waits forever; one timer for all of them, not one per request."""
        while True:
            await asyncio.sleep(1.0)
            limit = time.monotonic() - self.COMMIT_TIMEOUT_S
            for jid in [j for j, t in self._sent_at.items() if t < limit]:
                fut, _ = self._pending.pop(jid, (None, 0))
                self._sent_at.pop(jid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(LogError(f"the prediction log did not commit within {self.COMMIT_TIMEOUT_S:g} s"))

    # Called by `_WriterLink` on the loop: acknowledgements resolve their requests' futures at once,
    # with no reader task in between (one turn of the loop sooner under load).
    def _on_frame(self, msg: Any) -> None:
        if not self._ready.done():
            self._ready.set_result(msg)
            return
        for jid in msg["ok"]:
            fut, n = self._pending.pop(jid, (None, 0))
            self._sent_at.pop(jid, None)
            self.rows_written += n
            if fut is not None and not fut.done():  # a request cancelled meanwhile (client went away)
                fut.set_result(None)
        for jid, why in msg["failed"].items():
            fut, _ = self._pending.pop(int(jid), (None, 0))
            self._sent_at.pop(int(jid), None)
            if fut is not None and not fut.done():
                fut.set_exception(LogError(why))
        self.commits, self.failures = msg["commits"], msg["failures"]

    def _on_lost(self) -> None:
        if not self._ready.done():
            self._ready.set_result({"error": "it exited"})
        if not self._closed:
            self._gone = "the prediction log writer stopped unexpectedly"
            log.error("%s (exit code %s)", self._gone, self._proc.poll() if self._proc else None)
        self._fail_pending(LogError(self._gone or "the prediction log is closed"))
        if not self._lost.done():
            self._lost.set_result(None)

    def _fail_pending(self, exc: LogError) -> None:
        pending, self._pending = self._pending, {}
        self._sent_at.clear()
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def aclose(self, timeout: float = 30.0) -> None:
        """Commit everything sent so far, then stop the writer. Later writes raise `LogError`."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None and self._gone is None and not self._transport.is_closing():
            # The writer commits and acknowledges what precedes this frame, then exits: the socket closes.
            self._transport.write(encode([CLOSE, "", []]))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)
        if self._transport is not None:
            self._transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._fail_pending(LogError("the prediction log is closed"))
        self.engine.dispose()

    def close(self, timeout: float = 30.0) -> None:
        """`aclose` from outside the log's loop (stops the loop thread `open_sync` started)."""
        self._not_on_loop()
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.aclose(timeout), self._loop).result(3 * timeout)
        if self._own_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._own_thread.join(timeout)
            self._loop.close()

    @property
    def alive(self) -> bool:
        return not self._closed and self._gone is None

    def pending(self) -> int:
        return len(self._pending)

    # -- writes --------------------------------------------------------------------------
    def write_async(self, table: sa.Table, rows: list[dict[str, Any]] | dict[str, Any]) -> asyncio.Future:
        """On the log's loop: a future that resolves once `rows` are committed (LogError if not).
        For `predictions`, `rows` may be one `prediction_batch` (the server's fast path)."""
        if not self.alive:
            raise LogError(self._gone or "the prediction log is closed")
        if self._transport.get_write_buffer_size() > self.MAX_BUFFERED_BYTES:
            raise LogError("the prediction log writer is not keeping up")
        frame = encode([self._next_id + 1, table.name, rows])  # first: a row orjson refuses registers nothing
        self._next_id += 1
        fut = self._loop.create_future()
        self._pending[self._next_id] = (fut, len(rows["ids"]) if isinstance(rows, dict) else len(rows))
        self._sent_at[self._next_id] = time.monotonic()
        self._transport.write(frame)
        return fut

    def submit(self, table: sa.Table, rows: list[dict[str, Any]] | dict[str, Any]) -> concurrent.futures.Future:
        """From any thread but the log's loop: a future that resolves once committed."""
        self._not_on_loop()
        if not self.alive:
            raise LogError(self._gone or "the prediction log is closed")

        async def go() -> None:
            await self.write_async(table, rows)

        return asyncio.run_coroutine_threadsafe(go(), self._loop)

    def write(self, table: sa.Table, rows: list[dict[str, Any]] | dict[str, Any], timeout: float | None = 120) -> None:
        """Blocking `submit`: returns once committed, raises `LogError` if the store refused."""
        self.submit(table, rows).result(timeout)

    def _not_on_loop(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            raise RuntimeError("on the log's own event loop: use `await log.write_async(...)`")

    # -- feedback ------------------------------------------------------------------------
    def missing(self, ids: Sequence[str]) -> list[tuple[int, str]]:
        """(position, id) of each id the log does not hold. Predictions are never deleted, so an id
        found here is still there when its feedback row is written."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(sorted(set(ids)), 500):
                found.update(conn.execute(sa.select(predictions.c.id).where(predictions.c.id.in_(chunk))).scalars())
        return [(i, pid) for i, pid in enumerate(ids) if pid not in found]

    def add_feedback(self, labels: Sequence[tuple[str, int]]) -> int:
        """Store (prediction id, label) pairs from a thread; all or none (`UnknownPredictions`)."""
        missing = self.missing([pid for pid, _ in labels])
        if missing:
            raise UnknownPredictions(missing)
        self.write(feedback, feedback_rows(labels))
        return len(labels)

    def count(self, table: sa.Table = predictions) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def feedback_rows(labels: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    now = utcnow()
    return [{"prediction_id": pid, "label": int(y), "received_at": now} for pid, y in labels]


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def prediction_batch(
    name: str,
    version: str,
    x: np.ndarray,
    probs: np.ndarray,
    slices: list[dict[str, str]],
    ids: list[str] | None = None,
) -> dict[str, Any]:
    """One answered request, by column: what the server sends the writer. Whole arrays serialise in
    one call (orjson, in C); the writer process spends the per-row Python, not the request loop."""
    return {
        "ids": ids or [new_id() for _ in range(len(x))],
        "created_at": utcnow(),
        "model_name": name,
        "model_version": version,
        "request_id": new_id(),
        "inputs": x,
        "probabilities": probs,
        "slices": slices,
    }


def prediction_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The log rows of one `prediction_batch` (one request id, one timestamp, one model version)."""
    probs = np.asarray(batch["probabilities"], dtype=np.float32)
    x = np.asarray(batch["inputs"], dtype=np.float32)
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


def read_predictions(
    url: str,
    model_name: str | None = None,
    since: dt.datetime | None = None,
    last: int | None = None,
    ids: Sequence[str] | None = None,
):
    """A window of the log as a DataFrame, newest last: one row per prediction with its latest
    feedback label (`label`, NaN if none) and the shadow teacher's class and probabilities if scored.

    Inputs and probabilities stay as lists in one column each; `slice_<name>` columns are expanded.
    """
    import pandas as pd

    engine = open_store(url, create=False)
    if since is not None and since.tzinfo is not None:  # stored times are naive UTC
        since = since.astimezone(dt.UTC).replace(tzinfo=None)
    try:
        latest_label = (
            sa.select(feedback.c.prediction_id, feedback.c.label)
            .where(feedback.c.id.in_(sa.select(sa.func.max(feedback.c.id)).group_by(feedback.c.prediction_id)))
            .subquery()
        )
        latest_shadow = (
            sa.select(shadow.c.prediction_id, shadow.c.predicted_class, shadow.c.probabilities, shadow.c.teacher_uri)
            .where(shadow.c.id.in_(sa.select(sa.func.max(shadow.c.id)).group_by(shadow.c.prediction_id)))
            .subquery()
        )
        query = (
            sa.select(
                predictions,
                latest_label.c.label,
                latest_shadow.c.predicted_class.label("teacher_class"),
                latest_shadow.c.probabilities.label("teacher_probabilities"),
                latest_shadow.c.teacher_uri,
            )
            .outerjoin(latest_label, latest_label.c.prediction_id == predictions.c.id)
            .outerjoin(latest_shadow, latest_shadow.c.prediction_id == predictions.c.id)
        )
        if model_name is not None:
            query = query.where(predictions.c.model_name == model_name)
        if since is not None:
            query = query.where(predictions.c.created_at >= since)
        if ids is not None:
            query = query.where(predictions.c.id.in_(list(ids)))
        query = query.order_by(
            predictions.c.created_at.desc(), predictions.c.request_id, predictions.c.row_index.desc()
        )
        if last is not None:
            query = query.limit(last)
        with engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all())
    finally:
        engine.dispose()
    if frame.empty:
        return frame
    frame = frame.iloc[::-1].reset_index(drop=True)
    slices = pd.json_normalize(frame.pop("slices").tolist()).add_prefix("slice_")
    return pd.concat([frame, slices.set_index(frame.index)], axis=1)
