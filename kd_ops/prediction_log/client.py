"""The prediction log: every served prediction, the labels that arrive later, the shadow teacher's view.

Three append-only SQL tables behind SQLAlchemy Core, so the same code writes a SQLite file (WAL
mode, the default) or PostgreSQL when one machine is outgrown. Rows are never updated or deleted:
a label is a new `kd_ops_feedback` row (the latest one counts), a shadow score a new
`kd_ops_shadow` row.

Durability contract: a write resolves only after the transaction holding its rows has committed
(SQLite: `synchronous=FULL`, so the WAL is fsynced), and the server sends a response only after
that. Writes are group-committed by one writer process (`kd_ops.prediction_log.writer`): requests that
arrive while a commit is in flight share the next one, so the fsync is paid per batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kd_ops.prediction_log.feedback import feedback_job, replayed, request_digest
from kd_ops.prediction_log.protocol import CLOSE, decode_frames, encode, stored_predictions
from kd_ops.prediction_log.store import (
    DEFAULT_STORE,
    LogError,
    UnknownPredictions,
    _chunks,
    feedback,
    feedback_requests,
    open_store,
    predictions,
)

log = logging.getLogger(__name__)
# While writes keep coming, they go to the writer (and so into a commit) at most once per this
# long (`PredictionLog._flush`); a lone write is sent at once. Longer: fewer, larger commits (less
# CPU per row); shorter: less latency. uvloop's timers tick in milliseconds: 1 ms is 1-2 ms.
COMMIT_DELAY_S = 0.001


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
    """The server's handle on the log: writes go to a writer process (`kd_ops.prediction_log.writer`) and
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
        # Called on the loop with the seconds from each write's submission to its commit's
        # acknowledgement (the server's commit-latency histogram); None: nothing measured.
        self.on_commit: Callable[[float], None] | None = None
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
                [sys.executable, "-P", "-m", "kd_ops.prediction_log.writer", str(theirs.fileno())],
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
        observe = self.on_commit
        now = time.monotonic() if observe is not None else 0.0
        for jid in msg["ok"]:
            fut, n = self._pending.pop(jid, (None, 0))
            sent = self._sent_at.pop(jid, None)
            self.rows_written += n
            if observe is not None and sent is not None:
                observe(now - sent)
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
