"""The shadow teacher: a sampled share of requests is scored again by the teacher, off the request path.

Where labels arrive late or never, agreement between the deployed student and its teacher is
the label-free signal the monitors read. The request handler only offers work to a bounded
queue (never waits); one worker thread loads the teacher named in the served version's lineage,
scores the rows and appends them to `kd_ops_shadow` beside the student's predictions.

The teacher always gets the rows the student was scored on, encoded: for a table student (a
kd-ops `TableModel`) a teacher that is a table model over the same columns scores the encoded
rows directly (`encoded_proba`); any other table teacher (a table model fitted on other data, a
user's LightGBM or scikit-learn pipeline) gets them decoded to the student's columns and types
(`schema.decode`), as distillation gave them to it. A teacher given as a Python object
(lineage `object:...`) cannot be loaded again: the shadow is off for it, with one warning.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any

import numpy as np

from kd_ops.core.errors import first_line
from kd_ops.data.tables import TableSchema
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.store import shadow, utcnow
from kd_ops.serving.served_model import Proba, probability_fn

log = logging.getLogger(__name__)

RETRY_LOAD_S = 60.0  # a teacher that failed to load is tried again after this long
OBJECT_TEACHER = "object:"  # lineage of a teacher handed over as a Python object: nothing to load


def _same_columns(a: TableSchema, b: TableSchema) -> bool:
    """Encoded rows mean the same to both: same columns, kinds, category codes and tokenizers, in order."""
    key = lambda s: [(c.name, c.kind, c.categories, c.tokenizer, c.max_length) for c in s.columns]  # noqa: E731
    return key(a) == key(b)


def teacher_probability_fn(model: Any, schema: TableSchema | None, where: str = "teacher") -> Proba:
    """The teacher's probabilities over the rows the served student scores (encoded, for a table
    student), in the student's class order; `ConfigError` if its classes are not the student's."""
    from torch import nn

    from kd_ops.models.estimators import EstimatorTeacher, class_columns
    from kd_ops.models.table_model import TableModel

    if schema is None or isinstance(model, nn.Module):
        return probability_fn(model)  # rows as they are (a network over a table's encoded rows too)
    if isinstance(model, TableModel) and _same_columns(model.schema, schema):
        order = class_columns(model, schema.classes, where)
        encoded = probability_fn(model)
        return encoded if order is None else (lambda x: np.ascontiguousarray(encoded(x)[:, order]))
    # Decoded to the student's columns and types; classes lined up by the teacher's own names.
    adapted = EstimatorTeacher(model, schema.classes, schema, takes_frame=True, fingerprint="00" * 32, where=where)
    return lambda x: np.ascontiguousarray(adapted.probabilities(x), dtype=np.float32)


class ShadowScorer:
    def __init__(
        self,
        fraction: float,
        prediction_log: PredictionLog,
        teacher_uri: str | None = None,
        queue_size: int = 256,
        seed: int | None = None,
        allow_pickle: bool = False,
    ):
        """`allow_pickle`: the server's `--allow-pickle`, so the teacher loads under the same consent
        as the served version (without it, a teacher whose file runs code is refused, and logged)."""
        self.fraction = fraction
        self.allow_pickle = allow_pickle
        self.log = prediction_log
        self.override_uri = teacher_uri
        self.offered = self.scored = self.dropped = self.failed = 0
        self.agreed = 0  # scored rows where the teacher's class is the student's (of those offered with it)
        self.last_error: str | None = None
        self.off: str | None = None  # why the shadow scores nothing (a teacher that cannot be loaded)
        self._warned: set[str] = set()
        self._rng = random.Random(seed)
        self._queue: queue.Queue[tuple[str, list[str], np.ndarray, TableSchema | None, np.ndarray | None] | None] = (
            queue.Queue(maxsize=queue_size)
        )
        self._teachers: dict[tuple[str, Any], Proba] = {}
        self._failed_at: dict[tuple[str, Any], float] = {}
        self._thread = threading.Thread(target=self._run, name="kd-ops-shadow", daemon=True)
        self._thread.start()

    def offer(
        self,
        teacher_uri: str | None,
        ids: list[str],
        x: np.ndarray,
        schema: TableSchema | None = None,
        student_probs: np.ndarray | None = None,
    ) -> None:
        """Called on the request path after the predictions are committed: O(1), never blocks.
        `x`: the rows the student scored (encoded, for a table student, whose `schema` it is);
        `student_probs`: its probabilities, to count agreement (`agreed`) in the worker thread."""
        uri = self.override_uri or teacher_uri
        if not uri or self._rng.random() >= self.fraction:
            return
        if self.unloadable(uri):
            return
        self.offered += 1
        try:
            self._queue.put_nowait((uri, ids, x, schema, student_probs))
        except queue.Full:
            self.dropped += 1  # the teacher cannot keep up: sample fewer rather than slow the student

    def unloadable(self, uri: str) -> bool:
        """True for a teacher given as a Python object (lineage `object:...`): the shadow is off
        while the served version names it, said once per teacher, and `off` in /health says why."""
        if not any(u.strip().startswith(OBJECT_TEACHER) for u in uri.split(",")):
            self.off = None
            return False
        self.off = (
            f"teacher {uri} was given as a Python object, not a model URI, so it cannot be loaded here;"
            " pass --teacher URI to shadow this version"
        )
        if uri not in self._warned:
            self._warned.add(uri)
            log.warning("shadow: off: %s", self.off)
        return True

    def _teacher(self, uri: str, schema: TableSchema | None = None) -> Proba | None:
        # Per student schema too: after a swap to a version on other columns the same teacher is
        # adapted again (a table teacher reads the student's encoded rows through its schema).
        key = (uri, None if schema is None else (tuple(map(repr, schema.columns)), schema.classes))
        if key in self._teachers:
            return self._teachers[key]
        if time.monotonic() - self._failed_at.get(key, -RETRY_LOAD_S) < RETRY_LOAD_S:
            return None
        from kd_ops.models.loading import load_model

        try:
            # An ensemble's lineage lists its members; the shadow averages their probabilities.
            members = [
                teacher_probability_fn(load_model(u.strip(), allow_pickle=self.allow_pickle), schema, u.strip())
                for u in uri.split(",")
                if u.strip()
            ]
        except Exception as exc:  # noqa: BLE001 - never take the server down for the shadow
            self._failed_at[key] = time.monotonic()
            self.last_error = f"cannot load teacher {uri}: {first_line(exc)}"
            log.error("shadow: %s", self.last_error)
            return None
        fn = members[0] if len(members) == 1 else (lambda x: np.mean([m(x) for m in members], axis=0))
        self._teachers[key] = fn
        return fn

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            uri, ids, x, schema, student_probs = item
            teacher = self._teacher(uri, schema)
            if teacher is None:
                self.failed += len(ids)
                continue
            try:
                probs = np.ascontiguousarray(teacher(x), dtype=np.float32)
                now = utcnow()
                rows: list[dict[str, Any]] = [
                    {
                        "prediction_id": pid,
                        "teacher_uri": uri,
                        "probabilities": probs[i],
                        "predicted_class": int(probs[i].argmax()),
                        "created_at": now,
                    }
                    for i, pid in enumerate(ids)
                ]
                self.log.write(shadow, rows)
                self.scored += len(ids)
                if student_probs is not None:  # the same argmax as the answer's class
                    self.agreed += int((probs.argmax(axis=1) == student_probs.argmax(axis=1)).sum())
            except Exception as exc:  # noqa: BLE001
                self.failed += len(ids)
                self.last_error = first_line(exc)
                log.error("shadow: scoring %d rows failed: %s", len(ids), self.last_error)

    def close(self, timeout: float = 30.0) -> None:
        """Score what is queued (within `timeout`), then stop; before the prediction log closes."""
        self.fraction = 0.0  # no new work
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("shadow: %d queued requests left unscored at shutdown", self._queue.qsize())

    def queued(self) -> int:
        """Requests waiting for the teacher."""
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "offered": self.offered,
            "scored_rows": self.scored,
            "agreed_rows": self.agreed,
            "dropped_requests": self.dropped,
            "failed_rows": self.failed,
            "queued": self._queue.qsize(),
            "last_error": self.last_error,
            "off": self.off,
        }
