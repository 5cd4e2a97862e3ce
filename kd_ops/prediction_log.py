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
import hashlib
import logging
import os
import re
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

# One row per /feedback request that named a `request_id`, committed with its labels: a replay (or
# two racing copies) of the request stores nothing new. A table of its own, not a column on
# kd_ops_feedback: `create_all` adds a missing table to an existing store, a column needs a migration.
feedback_requests = sa.Table(
    "kd_ops_feedback_requests",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),  # sha256 of the labels: the same id with others is refused
    sa.Column("stored", sa.Integer, nullable=False),
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
    """Feedback named prediction ids the log does not hold (`missing` keeps their positions; the
    message names the first few and counts them all, so 60,000 unknown ids make a short message)."""

    def __init__(self, missing: list[tuple[int, str]]):
        self.missing = missing
        n = len(missing)
        shown = ", ".join(f"labels[{i}].prediction_id={pid!r}" for i, pid in missing[:5])
        more = f" and {n - 5} more" if n > 5 else ""
        super().__init__(f"{n} unknown prediction id{'s' if n != 1 else ''}: {shown}{more}")


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
# While writes keep coming, they go to the writer (and so into a commit) at most once per this
# long (`PredictionLog._flush`); a lone write is sent at once. Longer: fewer, larger commits (less
# CPU per row); shorter: less latency. uvloop's timers tick in milliseconds: 1 ms is 1-2 ms.
COMMIT_DELAY_S = 0.001
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


def stored_predictions(batch: dict[str, Any]) -> list[list[Any]]:
    """The rows of one `prediction_batch`, each a list in PREDICTION_COLUMNS order, as the store
    keeps them: JSON columns as the text the engine's `json_serializer` (`_json`) writes, the time
    as `stored_time`, class and confidence from the float32 probabilities. The same stored values
    as SQLAlchemy writes for `prediction_rows(batch)`, at a fraction of the cost: the JSON is
    written in C (orjson) and the rest is one list per row."""
    probs = np.ascontiguousarray(batch["probabilities"], dtype=np.float32)
    x = np.ascontiguousarray(batch["inputs"], dtype=np.float32)
    ids, slices = batch["ids"], batch["slices"]
    if probs.ndim != 2 or x.ndim != 2 or not (len(ids) == len(x) == len(probs) == len(slices)):
        raise ValueError(
            f"a prediction batch needs one id, input row, probability row and slices dict per row: got {len(ids)}"
            f" ids, inputs {x.shape}, probabilities {probs.shape}, {len(slices)} slices"
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
        self.failing_commits, self.last_commit_error = 0, None  # failed commits in a row, and why (/health)
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
        self._outbox: list[bytes] = []  # frames not sent yet (`_flush`)
        self._flush_handle: asyncio.Handle | None = None
        self._last_send = float("-inf")
        self._pace = COMMIT_DELAY_S
        self._closed = False
        self._gone: str | None = None  # why the writer stopped, if it did
        self._own_thread: threading.Thread | None = None

    # -- opening and closing -----------------------------------------------------------
    @classmethod
    async def open(
        cls, url: str = DEFAULT_STORE, sqlite_sync: str = "FULL", commit_delay_s: float = COMMIT_DELAY_S
    ) -> "PredictionLog":
        """Create the tables and start the writer; raises ValueError (bad URL) or `LogError`."""
        engine = await asyncio.to_thread(open_store, url, sqlite_sync)
        log_ = cls(url, engine, asyncio.get_running_loop())
        log_._pace = commit_delay_s
        try:
            await log_._start(sqlite_sync, commit_delay_s)
        except BaseException:
            await log_.aclose()
            raise
        return log_

    @classmethod
    def open_sync(cls, url: str = DEFAULT_STORE, sqlite_sync: str = "FULL", commit_delay_s: float = COMMIT_DELAY_S):
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
        # The pacing of commits happens here (`_flush`), where it also spares the sends: the writer
        # commits whatever has arrived as soon as it arrives.
        self._transport.write(encode({"url": self.url, "sqlite_sync": sqlite_sync}))
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
        if msg["ok"]:  # a commit went through: the store is writable again
            self.failing_commits, self.last_commit_error = 0, None
        elif msg["failures"] > self.failures:
            self.failing_commits += msg["failures"] - self.failures
            self.last_commit_error = msg.get("error") or next(iter(msg["failed"].values()), None)
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
            self._flush()  # what precedes the CLOSE frame is committed before the writer exits
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
        For `predictions`, `rows` may be one `prediction_batch` (the server's fast path): it goes to
        the writer in its stored form (`stored_predictions`), as [id, table, n rows, rows]."""
        if not self.alive:
            raise LogError(self._gone or "the prediction log is closed")
        if self._transport.get_write_buffer_size() > self.MAX_BUFFERED_BYTES:
            raise LogError("the prediction log writer is not keeping up")
        # First: a row that cannot be encoded registers nothing.
        if isinstance(rows, dict) and table is predictions:
            n = len(rows["ids"])
            frame = encode([self._next_id + 1, table.name, n, stored_predictions(rows)])
        else:
            n = len(rows)
            frame = encode([self._next_id + 1, table.name, rows])
        self._next_id += 1
        fut = self._loop.create_future()
        self._pending[self._next_id] = (fut, n)
        self._sent_at[self._next_id] = time.monotonic()
        self._outbox.append(frame)
        if self._flush_handle is None:
            due = self._last_send + self._pace
            if due <= self._loop.time():  # nothing sent lately (a lone request): at the end of this turn
                self._flush_handle = self._loop.call_soon(self._flush)
            else:
                self._flush_handle = self._loop.call_at(due, self._flush)
        return fut

    def _flush(self) -> None:
        """Send the frames waiting, in one write. While writes keep coming, at most one send per
        `commit_delay_s`: each send wakes the writer for a commit, and a commit (an fsync and
        ~0.3 ms of CPU on SQLite, whatever it holds) is what logging costs per row when commits
        are small. Pacing the sends here, not in the writer, also spares a system call and a
        wake-up of another process per request, which on two cores preempts the request loop."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        frames, self._outbox = self._outbox, []
        if frames and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(frames) if len(frames) > 1 else frames[0])
            self._last_send = self._loop.time()

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
            # An id with a NUL is no id the server gave out (and PostgreSQL refuses it in a query).
            for chunk in _chunks(sorted({pid for pid in ids if "\x00" not in pid}), 500):
                found.update(conn.execute(sa.select(predictions.c.id).where(predictions.c.id.in_(chunk))).scalars())
        return [(i, pid) for i, pid in enumerate(ids) if pid not in found]

    def add_feedback(self, labels: Sequence[tuple[str, int]], request_id: str | None = None) -> int:
        """Store (prediction id, label) pairs from a thread; all or none (`UnknownPredictions`).
        With `request_id`, a second call with the same id and labels stores nothing and returns what
        the first stored (`ReusedRequestId` if its labels differ); without one, every call stores."""
        digest = request_digest(labels)
        if request_id is not None and (prior := self.find_request(request_id)) is not None:
            return replayed(prior, request_id, digest)
        missing = self.missing([pid for pid, _ in labels])
        if missing:
            raise UnknownPredictions(missing)
        try:
            self.write(feedback, feedback_job(labels, request_id))
        except LogError:
            if request_id is None or (prior := self.find_request(request_id)) is None:
                raise
            self.refusal_was_replay()
            return replayed(prior, request_id, digest)
        return len(labels)

    def find_request(self, request_id: str) -> sa.Row | None:
        """The `kd_ops_feedback_requests` row (digest, stored) of an earlier feedback request, or None."""
        t = feedback_requests.c
        with self.engine.connect() as conn:
            return conn.execute(sa.select(t.digest, t.stored).where(t.request_id == request_id)).first()

    def refusal_was_replay(self) -> None:
        """The store refused a feedback write because a copy of the request committed first (the
        request id's primary key): that failed commit says nothing about the store's health."""
        if self.failing_commits > 0:
            self.failing_commits -= 1
            if self.failing_commits == 0:
                self.last_commit_error = None

    def count(self, table: sa.Table = predictions) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def feedback_rows(labels: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    now = utcnow()
    return [{"prediction_id": pid, "label": int(y), "received_at": now} for pid, y in labels]


# A row of a write that belongs to another table than the write's own: the writer inserts it there,
# in the same transaction (so a feedback request's row and its labels commit together, or neither).
ROW_TABLE = "__table__"
REQUEST_ID_PATTERN = r"^[!-~]{1,64}$"  # printable ASCII, no spaces: what every store keeps as it is


class ReusedRequestId(ValueError):
    """A feedback request_id seen before, with other labels: nothing is stored."""


def request_digest(labels: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256(orjson.dumps([[pid, int(y)] for pid, y in labels])).hexdigest()


def feedback_job(labels: Sequence[tuple[str, int]], request_id: str | None = None) -> list[dict[str, Any]]:
    """The rows of one feedback write: the labels, and with `request_id` first its
    `kd_ops_feedback_requests` row, whose primary key refuses the whole write when a copy of the
    request committed before (the writer reports that write as failed)."""
    rows = feedback_rows(labels)
    if request_id is None:
        return rows
    if not re.fullmatch(REQUEST_ID_PATTERN, request_id):
        raise ValueError(f"request_id must be 1-64 printable ASCII characters without spaces, got {request_id!r}")
    head = {ROW_TABLE: feedback_requests.name, "request_id": request_id, "digest": request_digest(labels)}
    return [{**head, "stored": len(rows), "received_at": rows[0]["received_at"] if rows else utcnow()}, *rows]


def replayed(prior: Any, request_id: str, digest: str) -> int:
    """What a replayed request stored the first time (`ReusedRequestId` if its labels differ)."""
    if prior.digest != digest:
        raise ReusedRequestId(
            f"request_id: {request_id!r} was already used for other labels; nothing was stored"
            " (a new request needs a new request_id)"
        )
    return int(prior.stored)


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


class StoredValueError(ValueError):
    """A value in the log that cannot be read back as the writer stores it: JSON that does not
    parse (NaN or Infinity written by hand, a number beyond float range, a truncated text), or
    inputs/probabilities that are not lists of finite numbers (orjson writes NaN as null).
    Names the table, the column and the row."""

    def __init__(self, table: str, column: str, prediction_id: str, why: str, row_id: int | None = None):
        self.table, self.column, self.prediction_id, self.row_id = table, column, prediction_id, row_id
        row = f"id={prediction_id!r}" if row_id is None else f"id={row_id} (prediction_id={prediction_id!r})"
        super().__init__(f"table {table}, column {column}, row {row}: {why}")


_WINDOW_CHUNK = 500  # ids per `IN (...)`: well under SQLite's variable limit (999 on old builds)
_JSON_TEXT = ("inputs", "probabilities", "slices")  # read as text and decoded here, so a bad row is named
_NUMBERS = ("inputs", "probabilities")


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

    Inputs and probabilities stay as lists in one column each; `slice_<name>` columns are expanded.
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
    for key in _NUMBERS:
        _check_numbers([rec[key] for rec in records], predictions.name, key, pids)
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
