"""The prediction-log writer process: receives batches of rows over a socket, commits them, acknowledges.

Why a process and not a thread: the server's request loop is bound by Python's GIL. A writer
thread in the same process steals it to build SQL parameters and wakes the loop at every commit;
on two cores that cost a third of the server's throughput. In its own process the writer has
its own interpreter, and the request loop only serialises rows (orjson, in C) and writes them to
a socket.

Protocol, both ways: frames of a 4-byte little-endian length and an orjson body.
  parent -> writer: {"url", "sqlite_sync", "commit_delay_s"} first, then [job id, table, rows]
                    per write; [-1, "", []] asks it to commit what it holds and exit.
  writer -> parent: {"ready": true} or {"error": "..."} first, then per commit
                    {"ok": [ids], "failed": {id: message}, "commits": n, "rows": n, "failures": n}.
An acknowledgement is sent only after the commit returned, so an acknowledged row is stored. The
writer ignores SIGINT and SIGTERM: it stops when the server tells it to, or when the socket
closes (the server is gone); either way it never leaves half a transaction behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import socket
import sys
import time
from typing import Any

import sqlalchemy as sa

from kd_ops.config import first_line
from kd_ops.prediction_log import (
    CLOSE,
    decode_frames,
    encode,
    metadata,
    open_store,
    prediction_rows,
    predictions,
)

log = logging.getLogger(__name__)


class _Refused(Exception):
    """The store refused these rows (a constraint): the other jobs of the batch may still commit."""


class _Insert:
    """One table's INSERT for the store's dialect, run through the DBAPI cursor: SQLAlchemy's
    per-statement machinery costs more than the insert itself at the rates a server sees. Values
    go through each column type's own bind processor, so the stored form is what SQLAlchemy writes
    and reads back. With a positional paramstyle (SQLite's `?`) a batch is one multi-row
    `INSERT ... VALUES (...), (...)` statement."""

    def __init__(self, table: sa.Table, dialect: sa.engine.Dialect, keys: tuple[str, ...], max_params: int):
        # Only the columns given: an autoincrement id left out is filled by the database (PostgreSQL
        # refuses an explicit NULL there).
        # inline(): no RETURNING of the generated id (PostgreSQL would add one; nobody reads it).
        compiled = table.insert().inline().compile(dialect=dialect, column_keys=list(keys))
        self.sql = str(compiled)
        self.keys = list(compiled.positiontup) if compiled.positiontup else None  # None: named paramstyle
        self.processors = {
            c.key: proc
            for c in table.columns
            if (proc := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        # Rows arrive as JSON: timestamps are ISO strings again, turned back into datetimes here.
        self.times = {c.key for c in table.columns if isinstance(c.type, sa.DateTime)}
        self.multi_row: tuple[str, str] | None = None
        head, sep, values = self.sql.rpartition(" VALUES ")
        if self.keys is not None and sep and values.startswith("(") and values.endswith(")"):
            self.multi_row = (head + sep, values)
        self.rows_per_statement = max(1, max_params // max(1, len(keys)))

    def _value(self, key: str, value: Any) -> Any:
        if key in self.times and isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        proc = self.processors.get(key)
        return proc(value) if proc else value

    def execute(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        processed = [{k: self._value(k, v) for k, v in row.items()} for row in rows]
        if self.keys is None:
            cursor.executemany(self.sql, processed)
            return
        if self.multi_row is None:
            cursor.executemany(self.sql, [tuple(row.get(k) for k in self.keys) for row in processed])
            return
        head, one = self.multi_row
        step = self.rows_per_statement
        for i in range(0, len(processed), step):
            chunk = processed[i : i + step]
            cursor.execute(head + ", ".join([one] * len(chunk)), [row.get(k) for row in chunk for k in self.keys])


class Committer:
    """Commits batches of jobs; a job the store refuses (a constraint) fails alone."""

    def __init__(self, url: str, sqlite_sync: str = "FULL"):
        self.engine = open_store(url, sqlite_sync)
        self.tables = {t.name: t for t in metadata.sorted_tables}
        self.commits = self.rows = self.failures = 0
        self._inserts: dict[tuple[str, tuple[str, ...]], _Insert] = {}
        self._raw: Any = None  # one DBAPI connection, held between commits
        self.max_params = 30000
        if self.engine.dialect.name == "sqlite":  # older SQLite builds allow only 999 variables
            import sqlite3

            with self.engine.connect() as conn:
                limit = conn.connection.driver_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self.max_params = min(self.max_params, limit)

    def commit(self, jobs: list[tuple[int, str, list[dict[str, Any]]]]) -> dict[int, str | None]:
        """{job id: None if committed, else why not}."""
        try:
            self._execute(jobs)
        except _Refused as exc:
            if len(jobs) > 1:
                out: dict[int, str | None] = {}
                for job in jobs:
                    out.update(self.commit([job]))
                return out
            return self._failed(jobs, exc.__cause__ or exc)
        except Exception as exc:  # noqa: BLE001 - store unreachable, locked, full: these writes fail
            return self._failed(jobs, exc)
        self.commits += 1
        self.rows += sum(len(rows) for _, _, rows in jobs)
        return {jid: None for jid, _, _ in jobs}

    def _failed(self, jobs: list, exc: BaseException) -> dict[int, str | None]:
        self.failures += 1
        # One line and never the parameters (the engine hides them): they hold the clients' inputs.
        log.error("prediction log: commit of %d rows failed: %s", sum(len(r) for _, _, r in jobs), first_line(exc))
        return {jid: "prediction log write failed" for jid, _, _ in jobs}

    def _execute(self, jobs: list[tuple[int, str, list[dict[str, Any]]]]) -> None:
        groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
        for _, name, rows in jobs:
            for row in rows:
                key = (name, tuple(row))
                if key not in self._inserts:
                    self._inserts[key] = _Insert(self.tables[name], self.engine.dialect, key[1], self.max_params)
                groups.setdefault(key, []).append(row)
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        cursor = self._raw.cursor()
        try:
            # Parents before children: shadow and feedback rows point at predictions.
            for key in sorted(groups, key=lambda k: k[0] != predictions.name):
                self._inserts[key].execute(cursor, groups[key])
            self._raw.commit()
        except Exception as exc:
            try:
                self._raw.rollback()
            except Exception:  # noqa: BLE001 - the connection is gone: a new one next time
                self._raw.invalidate()
                self._raw = None
            dbapi = self.engine.dialect.loaded_dbapi
            connection_level = (dbapi.OperationalError, dbapi.InterfaceError)
            if isinstance(exc, dbapi.Error) and not isinstance(exc, connection_level):
                raise _Refused(exc) from exc  # about some row (a constraint, a value too long)
            raise
        finally:
            cursor.close()

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        self.engine.dispose()


def serve_socket(sock: socket.socket) -> None:
    """The writer's loop: read what has arrived, commit it as one batch, acknowledge, repeat."""
    buf = bytearray()
    while not (frames := decode_frames(buf)):
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data
    settings = frames.pop(0)
    try:
        committer = Committer(settings["url"], settings.get("sqlite_sync", "FULL"))
    except Exception as exc:  # noqa: BLE001 - reported to the server, which refuses to start
        sock.sendall(encode({"error": first_line(exc)}))
        return
    sock.sendall(encode({"ready": True}))
    delay = float(settings.get("commit_delay_s", 0.0))
    last_jobs, closing = 0, False
    try:
        while not closing:
            if not frames:
                data = sock.recv(1 << 20)
                if not data:
                    break  # the server is gone: nobody waits for an acknowledgement
                buf += data
                if last_jobs > 1 and delay:
                    # Requests are arriving together: let the ones in flight join this commit
                    # (PostgreSQL's commit_delay, in effect). One request at a time never waits.
                    time.sleep(delay)
                sock.setblocking(False)
                try:
                    while chunk := sock.recv(1 << 20):
                        buf += chunk
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                frames = decode_frames(buf)
            jobs = []
            outcome: dict[int, str | None] = {}
            for jid, name, rows in frames:
                if jid == CLOSE:
                    closing = True
                    break
                try:
                    jobs.append((jid, name, prediction_rows(rows) if isinstance(rows, dict) else rows))
                except Exception as exc:  # noqa: BLE001 - a malformed job fails alone
                    log.error("prediction log: malformed write: %s", first_line(exc))
                    outcome[jid] = "prediction log write failed"
            frames = []
            if not jobs and not outcome:
                continue
            outcome.update(committer.commit(jobs) if jobs else {})
            last_jobs = len(jobs)
            sock.sendall(
                encode(
                    {
                        "ok": [j for j, err in outcome.items() if err is None],
                        "failed": {str(j): err for j, err in outcome.items() if err is not None},
                        "commits": committer.commits,
                        "rows": committer.rows,
                        "failures": committer.failures,
                    }
                )
            )
    finally:
        committer.close()


def main(argv: list[str]) -> int:
    # The server decides when the writer stops (a Ctrl-C or SIGTERM reaches the whole process
    # group): it first lets in-flight requests finish, which needs the writer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s kd-ops log writer: %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    try:
        serve_socket(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server went away
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
