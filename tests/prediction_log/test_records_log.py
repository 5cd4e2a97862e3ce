"""A table model's predictions in the log: the raw records as the client sent them (nulls kept), on
SQLite and PostgreSQL, through both write paths (the server's stored form and SQLAlchemy's own)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import orjson
import pytest

from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.protocol import PREDICTION_COLUMNS, prediction_batch, prediction_rows, stored_predictions
from kd_ops.prediction_log.store import predictions

from .stored import stored_columns

RECORDS = [
    {"carrier": "UA", "distance": 1400, "delayed_before": True, "note": 'Kö"ln\\'},
    {"carrier": None, "distance": 12.5, "delayed_before": None, "note": ""},
    {"distance": -0.0, "carrier": "AA", "delayed_before": False, "note": None},  # key order as sent
]


def _batch(ids: list[str]) -> dict:
    x = np.array([[0, 1400, 1, 0], [np.nan, 12.5, np.nan, 1], [1, -0.0, 0, np.nan]], dtype=np.float32)
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    batch = prediction_batch("m", "3", x, probs, [{"carrier": "UA"}, {}, {}], ids, records=RECORDS)
    batch["created_at"] = dt.datetime(2026, 1, 2, 3, 4, 5)
    return batch


def test_records_are_stored_as_sent_by_both_write_paths(store_url):
    log = PredictionLog.open_sync(store_url)
    try:
        via_dicts = _batch([f"a{i:031d}" for i in range(3)])
        via_stored = {**via_dicts, "ids": [f"b{i:031d}" for i in range(3)]}
        log.write(predictions, prediction_rows(via_dicts))  # SQLAlchemy's bind processors
        log.write(predictions, via_stored)  # the server's fast path
    finally:
        log.close()
    a, b = stored_columns(store_url, via_dicts["ids"]), stored_columns(store_url, via_stored["ids"])
    assert [a[i] for i in via_dicts["ids"]] == [b[i] for i in via_stored["ids"]]
    inputs = PREDICTION_COLUMNS.index("inputs") - 1
    for i, pid in enumerate(via_stored["ids"]):
        text = b[pid][inputs]
        assert orjson.loads(text) == RECORDS[i]
        assert list(orjson.loads(text)) == list(RECORDS[i])  # the keys in the order the client sent them
    assert orjson.loads(b[via_stored["ids"][1]][inputs])["carrier"] is None
    classes = PREDICTION_COLUMNS.index("predicted_class") - 1
    assert [int(b[pid][classes]) for pid in via_stored["ids"]] == [0, 1, 0]


def test_a_float_matrix_still_takes_the_array_path_and_a_short_batch_is_refused():
    x = np.array([[0.1, 2.0]], dtype=np.float64)
    rows = stored_predictions(prediction_batch("m", "1", x, np.array([[1.0]]), [{}], ["p"]))
    assert rows[0][PREDICTION_COLUMNS.index("inputs")] == "[0.1,2.0]"  # float32, shortest text
    with pytest.raises(ValueError, match="one record per row"):
        prediction_batch("m", "1", np.zeros((2, 2), np.float32), np.ones((2, 1)), [{}, {}], records=RECORDS[:1])
    batch = prediction_batch("m", "1", np.zeros((3, 2), np.float32), np.ones((3, 1)), [{}, {}, {}], records=RECORDS)
    batch["ids"] = ["p"]
    with pytest.raises(ValueError, match="3 records"):
        stored_predictions(batch)
