"""The prediction log: every served prediction, the labels that arrive later, the shadow teacher's view.

Three append-only SQL tables behind SQLAlchemy Core, so the same code writes a SQLite file (WAL
mode, the default) or PostgreSQL when one machine is outgrown. Rows are never updated or deleted:
a label is a new `kd_ops_feedback` row (the latest one counts), a shadow score a new
`kd_ops_shadow` row.

Durability contract: `PredictionLog.write` returns only after the transaction holding the rows has
committed (SQLite: `synchronous=FULL`, so the WAL is fsynced), and the server sends a response
only after that. Writes are group-committed by one writer thread: requests that arrive while a
commit is in flight share the next one, so the fsync is paid per batch, not per request.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
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
    return uuid.uuid4().hex


def _json(value: Any) -> str:
    # orjson writes numpy rows directly, float32 in its shortest form (0.1, not 0.10000000149).
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def open_store(url: str, sqlite_sync: str = "FULL") -> Engine:
    """An engine for `url` with the tables created. SQLite gets WAL, a busy timeout and foreign keys.

    `sqlite_sync="FULL"` fsyncs the WAL at each commit (a committed prediction survives power loss);
    "NORMAL" survives a crash of the process but not of the machine.
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(f"not a SQLAlchemy database URL: {url!r} (e.g. sqlite:///predictions.db)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, json_serializer=_json, json_deserializer=orjson.loads, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DBAPI connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sqlite_sync}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    metadata.create_all(engine)
    return engine


@dataclass
class _Job:
    table: sa.Table
    rows: list[dict[str, Any]]
    future: concurrent.futures.Future


class PredictionLog:
    """Group-committing writer plus the reads the server needs (feedback ids, counts)."""

    def __init__(self, url: str = DEFAULT_STORE, sqlite_sync: str = "FULL", max_batch_rows: int = 4096):
        self.url = url
        self.engine = open_store(url, sqlite_sync)
        self.max_batch_rows = max_batch_rows
        self.rows_written = 0
        self.commits = 0
        self.failures = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kd-ops-log-writer", daemon=True)
        self._thread.start()

    # -- writes --------------------------------------------------------------------------
    def submit(self, table: sa.Table, rows: list[dict[str, Any]]) -> concurrent.futures.Future:
        """Queue rows for the next commit; the future resolves once they are committed."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            fut.set_exception(LogError("the prediction log is closed"))
        else:
            self._queue.put(_Job(table, rows, fut))
        return fut

    def write(self, table: sa.Table, rows: list[dict[str, Any]], timeout: float | None = None) -> None:
        """Blocking `submit`: returns once committed, raises `LogError` if the store refused."""
        self.submit(table, rows).result(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, n, stop = [job], len(job.rows), False
            while n < self.max_batch_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt.rows)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        by_table: dict[str, list[dict[str, Any]]] = {}
        tables = {}
        for job in batch:
            by_table.setdefault(job.table.name, []).extend(job.rows)
            tables[job.table.name] = job.table
        try:
            with self.engine.begin() as conn:
                # Parents before children: shadow rows point at predictions of the same batch.
                for name in sorted(by_table, key=lambda t: t != predictions.name):
                    conn.execute(tables[name].insert(), by_table[name])
        except Exception as exc:  # noqa: BLE001 - any store failure fails exactly these writes
            if len(batch) > 1:  # find the job the store refused; the others still commit
                for job in batch:
                    self._commit([job])
                return
            self.failures += 1
            log.error("prediction log: commit of %d rows failed: %s", sum(map(len, by_table.values())), exc)
            for job in batch:
                job.future.set_exception(LogError(f"prediction log write failed: {str(exc).splitlines()[0]}"))
            return
        self.commits += 1
        self.rows_written += sum(len(job.rows) for job in batch)
        for job in batch:
            job.future.set_result(None)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything queued, then stop the writer."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self.engine.dispose()

    # -- feedback ------------------------------------------------------------------------
    def add_feedback(self, labels: Sequence[tuple[str, int]]) -> int:
        """Store (prediction id, label) pairs; all or none. Unknown ids raise `UnknownPredictions`.

        Predictions are never deleted, so an id found by the check is still there at the insert.
        """
        ids = [pid for pid, _ in labels]
        found: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(sorted(set(ids)), 500):
                found.update(conn.execute(sa.select(predictions.c.id).where(predictions.c.id.in_(chunk))).scalars())
        missing = [(i, pid) for i, pid in enumerate(ids) if pid not in found]
        if missing:
            raise UnknownPredictions(missing)
        now = utcnow()
        self.write(feedback, [{"prediction_id": pid, "label": int(y), "received_at": now} for pid, y in labels])
        return len(labels)

    def count(self, table: sa.Table = predictions) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def prediction_rows(
    name: str,
    version: str,
    x: np.ndarray,
    probs: np.ndarray,
    slices: list[dict[str, str]],
    ids: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The log rows for one answered batch (one request id, one timestamp, one model version)."""
    ids = ids or [new_id() for _ in range(len(x))]
    classes = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    request_id, now = new_id(), utcnow()
    return [
        {
            "id": ids[i],
            "created_at": now,
            "model_name": name,
            "model_version": version,
            "request_id": request_id,
            "row_index": i,
            "inputs": x[i],
            "probabilities": probs[i],
            "predicted_class": int(classes[i]),
            "confidence": float(confidence[i]),
            "slices": slices[i],
        }
        for i in range(len(x))
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

    engine = open_store(url)
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
