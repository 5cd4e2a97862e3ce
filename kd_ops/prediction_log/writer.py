"""The prediction-log writer process: receives batches of rows over a socket, commits them, acknowledges.

Why a process and not a thread: the server's request loop is bound by Python's GIL. A writer
thread in the same process steals it to build SQL parameters and wakes the loop at every commit;
on two cores that cost a third of the server's throughput. In its own process the writer has
its own interpreter, and the request loop only serialises rows (orjson, in C) and writes them to
a socket.

Where the writer's CPU goes (measured in-process, 1-row writes, SQLite WAL, bench/serve_load.md
for the figures under load): a commit costs ~100-150 us whatever it holds (the fsync, with
synchronous=FULL) and each row ~11-15 us (SQLite's own insert: B-tree, indexes, WAL pages). Rows
used to cost ~28 us more in Python (decoding into lists, `prediction_rows` dicts, then each JSON
column's bind processor writing the same values again); they now arrive in their stored form and
go to the driver as they are. What is left is C, so a thread would no longer steal much of the
GIL, but the fsync wait and the wake-ups would still land on the request loop's process: the
process stays. The server paces its sends (`PredictionLog._flush`), so commits hold more rows.

Protocol, both ways: frames of a 4-byte little-endian length and an orjson body.
  parent -> writer: {"url", "sqlite_sync"} first, then per write either
                    [job id, table, rows] (rows as dicts, each value through its column type's
                    bind processor) or, for predictions, [job id, table, n, rows] with each row a
                    list already in its stored form (`prediction_log.stored_predictions`);
                    [-1, "", []] asks it to commit what it holds and exit.
  writer -> parent: {"ready": true} or {"error": "..."} first, then per commit
                    {"ok": [ids], "failed": {id: message}, "commits": n, "rows": n, "failures": n}.
An acknowledgement is sent only after the commit returned, so an acknowledged row is stored. The
writer ignores SIGINT and SIGTERM: it stops when the server tells it to, or when the socket
closes (the server is gone); either way it never leaves half a transaction behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import signal
import socket
import sys
from typing import Any

import sqlalchemy as sa

from kd_ops.core.errors import first_line
from kd_ops.prediction_log.protocol import CLOSE, PREDICTION_COLUMNS, ROW_TABLE, decode_frames, encode
from kd_ops.prediction_log.store import metadata, open_store, predictions

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


class Stored:
    """The rows of one job in their stored form (`prediction_log.stored_predictions`): one list
    of values per row, in the table's column order, bound as they are."""

    __slots__ = ("rows",)

    def __init__(self, n: int, rows: list[list[Any]]):
        # A row of the wrong length is refused by the driver (wrong number of bindings): that job
        # then fails alone, like one the store refuses; no per-row Python check here.
        if not isinstance(rows, list) or n != len(rows):
            raise ValueError(f"a stored-form job of {n!r} rows came with {type(rows).__name__} rows")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


class _StoredInsert:
    """The INSERT of stored-form rows: the SQL SQLAlchemy compiles for the dialect (its casts
    included, e.g. PostgreSQL's `::JSON`), bound straight from the rows, so the driver's C code
    does all the per-value work. SQLite binds the texts exactly as the engine's bind processors
    would have made them; PostgreSQL parses the timestamp text and keeps the JSON text.

    SQLite: one prepared statement stepped per row (`executemany`); measured against a multi-row
    `VALUES (...), (...)`, it costs less CPU per row (10 against 14 us at 16 rows a commit).
    PostgreSQL (psycopg2, whose `executemany` is a round trip per row): one multi-row statement."""

    def __init__(self, table: sa.Table, dialect: sa.engine.Dialect, columns: tuple[str, ...], max_params: int):
        compiled = table.insert().inline().compile(dialect=dialect, column_keys=list(columns))
        sql = str(compiled)
        self.multi: tuple[str, str] | None = None
        if compiled.positiontup is not None:  # qmark / format / numeric: parameters by position
            if list(compiled.positiontup) != list(columns):
                raise ValueError(f"{dialect.name}: the INSERT's parameters are not in column order")
            self.sql = sql
        else:  # pyformat (psycopg2): %(name)s -> %s, names checked to come in column order
            head, sep, values = sql.rpartition(" VALUES ")
            if not sep or re.findall(r"%\(([^)]+)\)s", values) != list(columns):
                raise ValueError(f"{dialect.name}: cannot bind the INSERT's parameters by position")
            self.sql = re.sub(r"%\(([^)]+)\)s", "%s", sql)
            self.multi = (head + sep, re.sub(r"%\(([^)]+)\)s", "%s", values))
        self.rows_per_statement = max(1, max_params // len(columns))
        self._multi_sql: dict[int, str] = {}  # statement per row count

    def execute(self, cursor: Any, rows: list[list[Any]]) -> None:
        if self.multi is None:
            cursor.executemany(self.sql, rows)
            return
        head, one = self.multi
        step = self.rows_per_statement
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            sql = self._multi_sql.get(len(chunk))
            if sql is None:
                sql = self._multi_sql[len(chunk)] = head + ", ".join([one] * len(chunk))
            cursor.execute(sql, [v for row in chunk for v in row])


class Committer:
    """Commits batches of jobs; a job the store refuses (a constraint) fails alone."""

    def __init__(self, url: str, sqlite_sync: str = "FULL"):
        self.engine = open_store(url, sqlite_sync)
        self.tables = {t.name: t for t in metadata.sorted_tables}
        self.commits = self.rows = self.failures = 0
        self.last_error: str | None = None  # first line of the last failed commit's error, for the server's /health
        self._inserts: dict[tuple[str, tuple[str, ...]], _Insert] = {}
        self._raw: Any = None  # one DBAPI connection, held between commits
        self._stored_insert: _StoredInsert | None = None
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
        self.last_error = first_line(exc)
        # One line and never the parameters (the engine hides them): they hold the clients' inputs.
        log.error("prediction log: commit of %d rows failed: %s", sum(len(r) for _, _, r in jobs), first_line(exc))
        return {jid: "prediction log write failed" for jid, _, _ in jobs}

    def _execute(self, jobs: list[tuple[int, str, list[dict[str, Any]]]]) -> None:
        groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
        stored: dict[str, list[list[Any]]] = {}  # table -> the rows of its stored-form jobs
        for _, name, rows in jobs:
            if isinstance(rows, Stored):
                if name != predictions.name:
                    raise _Refused(ValueError(f"stored-form rows are for {predictions.name}, not {name}"))
                if name in stored:
                    stored[name] += rows.rows
                else:
                    stored[name] = rows.rows[:] if len(jobs) > 1 else rows.rows
                continue
            for row in rows:
                table = name
                if ROW_TABLE in row:  # a row of another table, in this job's transaction (prediction_log.feedback_job)
                    row = dict(row)
                    table = row.pop(ROW_TABLE)
                key = (table, tuple(row))
                if key not in self._inserts:
                    self._inserts[key] = _Insert(self.tables[table], self.engine.dialect, key[1], self.max_params)
                groups.setdefault(key, []).append(row)
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        cursor = self._raw.cursor()
        try:
            # Parents before children: shadow and feedback rows point at predictions.
            for name, stored_rows in stored.items():
                if self._stored_insert is None:
                    self._stored_insert = _StoredInsert(
                        self.tables[name], self.engine.dialect, PREDICTION_COLUMNS, self.max_params
                    )
                try:
                    self._stored_insert.execute(cursor, stored_rows)
                except (IndexError, TypeError, ValueError) as exc:  # a row of the wrong shape: about that job
                    raise _Refused(exc) from exc
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


_RECV = 1 << 20


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
    closing = False
    try:
        while not closing:
            if not frames:
                # No waiting for more here: the server paces its sends (`PredictionLog._flush`), so
                # each arrival is a batch already, and whatever arrives during a commit joins the next.
                data = sock.recv(_RECV)  # blocks only if nothing came meanwhile
                if not data:
                    break  # the server is gone: nobody waits for an acknowledgement
                buf += data
                if len(data) == _RECV:  # there may be more (MSG_DONTWAIT: no fcntl to toggle blocking)
                    try:
                        while chunk := sock.recv(_RECV, socket.MSG_DONTWAIT):
                            buf += chunk
                    except BlockingIOError:
                        pass
                frames = decode_frames(buf)
            jobs = []
            outcome: dict[int, str | None] = {}
            for frame in frames:
                jid, name, rows = frame[:3]
                if jid == CLOSE:
                    closing = True
                    break
                try:
                    # [id, table, n rows, rows]: predictions in their stored form (the client turns
                    # every prediction batch into it); [id, table, rows]: row dicts of any table.
                    job: Any = Stored(frame[2], frame[3]) if len(frame) == 4 else rows
                    jobs.append((jid, name, job))
                except Exception as exc:  # noqa: BLE001 - a malformed job fails alone
                    log.error("prediction log: malformed write: %s", first_line(exc))
                    outcome[jid] = "prediction log write failed"
            frames = []
            if not jobs and not outcome:
                continue
            outcome.update(committer.commit(jobs) if jobs else {})
            sock.sendall(
                encode(
                    {
                        "ok": [j for j, err in outcome.items() if err is None],
                        "failed": {str(j): err for j, err in outcome.items() if err is not None},
                        "commits": committer.commits,
                        "rows": committer.rows,
                        "failures": committer.failures,
                        "error": committer.last_error,
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
