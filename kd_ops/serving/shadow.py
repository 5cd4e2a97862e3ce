"""The shadow teacher: a sampled share of requests is scored again by the teacher, off the request path.

Where labels arrive late or never, agreement between the deployed student and its teacher is
the label-free signal the monitors read. The request handler only offers work to a bounded
queue (never waits); one worker thread loads the teacher named in the served version's lineage,
scores the rows and appends them to `kd_ops_shadow` beside the student's predictions.
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
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.store import shadow, utcnow
from kd_ops.serving.served_model import Proba, load_probability_fn

log = logging.getLogger(__name__)

RETRY_LOAD_S = 60.0  # a teacher that failed to load is tried again after this long


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
        self.last_error: str | None = None
        self._rng = random.Random(seed)
        self._queue: queue.Queue[tuple[str, list[str], np.ndarray] | None] = queue.Queue(maxsize=queue_size)
        self._teachers: dict[str, Proba] = {}
        self._failed_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="kd-ops-shadow", daemon=True)
        self._thread.start()

    def offer(self, teacher_uri: str | None, ids: list[str], x: np.ndarray) -> None:
        """Called on the request path after the predictions are committed: O(1), never blocks."""
        uri = self.override_uri or teacher_uri
        if not uri or self._rng.random() >= self.fraction:
            return
        self.offered += 1
        try:
            self._queue.put_nowait((uri, ids, x))
        except queue.Full:
            self.dropped += 1  # the teacher cannot keep up: sample fewer rather than slow the student

    def _teacher(self, uri: str) -> Proba | None:
        if uri in self._teachers:
            return self._teachers[uri]
        if time.monotonic() - self._failed_at.get(uri, -RETRY_LOAD_S) < RETRY_LOAD_S:
            return None
        try:
            # An ensemble's lineage lists its members; the shadow averages their probabilities.
            members = [
                load_probability_fn(u.strip(), allow_pickle=self.allow_pickle) for u in uri.split(",") if u.strip()
            ]
        except Exception as exc:  # noqa: BLE001 - never take the server down for the shadow
            self._failed_at[uri] = time.monotonic()
            self.last_error = f"cannot load teacher {uri}: {first_line(exc)}"
            log.error("shadow: %s", self.last_error)
            return None
        fn = members[0] if len(members) == 1 else (lambda x: np.mean([m(x) for m in members], axis=0))
        self._teachers[uri] = fn
        return fn

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            uri, ids, x = item
            teacher = self._teacher(uri)
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

    def stats(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "offered": self.offered,
            "scored_rows": self.scored,
            "dropped_requests": self.dropped,
            "failed_rows": self.failed,
            "queued": self._queue.qsize(),
            "last_error": self.last_error,
        }
