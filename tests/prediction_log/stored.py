"""Reading the prediction log back as the store holds it, for tests of the write paths."""

from __future__ import annotations

import sqlalchemy as sa

from kd_ops.prediction_log.protocol import PREDICTION_COLUMNS
from kd_ops.prediction_log.store import open_store, predictions


def stored_columns(url: str, ids: list[str]) -> dict[str, tuple]:
    """Each row as the store holds it, every column read back as text (JSON and timestamps too)."""
    engine = open_store(url)
    cols = [sa.cast(predictions.c[name], sa.Text) for name in PREDICTION_COLUMNS]
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(*cols).where(predictions.c.id.in_(ids))).all()
    finally:
        engine.dispose()
    return {row[0]: tuple(row[1:]) for row in rows}
