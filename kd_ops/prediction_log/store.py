"""The prediction log's tables (SQLAlchemy Core) and opening a store: SQLite file or PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any, Iterable

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

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


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
