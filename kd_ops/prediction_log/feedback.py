"""Labels that arrive later: feedback rows, and the request ids that make a replayed request a no-op."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Sequence

import orjson

from kd_ops.prediction_log.protocol import ROW_TABLE
from kd_ops.prediction_log.store import feedback_requests, utcnow


def feedback_rows(labels: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    now = utcnow()
    return [{"prediction_id": pid, "label": int(y), "received_at": now} for pid, y in labels]
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
