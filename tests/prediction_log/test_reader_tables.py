"""Window reads of a table model's log (real SQLite and PostgreSQL stores): the raw records come
back as the server stored them, beside an image model's float rows in the same log."""

from __future__ import annotations

import numpy as np
import pytest

from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.reader import StoredValueError, read_predictions
from kd_ops.prediction_log.store import new_id, open_store, predictions, utcnow


def table_rows(records: list[dict], name: str = "t", version: str = "1", probabilities=None) -> list[dict]:
    """Log rows whose inputs are records, as a table model's server stores them."""
    now, request = utcnow(), new_id()
    probs = probabilities if probabilities is not None else np.full((len(records), 2), 0.5)
    return [
        {
            "id": new_id(),
            "created_at": now,
            "model_name": name,
            "model_version": version,
            "request_id": request,
            "row_index": i,
            "inputs": record,
            "probabilities": [float(p) for p in probs[i]],
            "predicted_class": int(np.argmax(probs[i])),
            "confidence": float(np.max(probs[i])),
            "slices": {"contract": "One year"},
        }
        for i, record in enumerate(records)
    ]


def insert(url: str, rows: list[dict]) -> None:
    engine = open_store(url)
    try:
        with engine.begin() as conn:
            conn.execute(predictions.insert(), rows)
    finally:
        engine.dispose()


RECORDS = [
    {"tenure": 3, "contract": "One year", "senior": True, "charges": 20.5},
    {"tenure": None, "contract": None, "senior": False, "charges": 1e3},
    {"tenure": 7, "contract": "Crypto", "senior": None, "charges": -0.25},
]


def test_table_records_come_back_as_stored(store_url):
    insert(store_url, table_rows(RECORDS))
    frame = read_predictions(store_url, model_name="t")
    assert frame["inputs"].tolist() == RECORDS  # names, nulls, booleans and numbers as sent
    assert frame["slice_contract"].tolist() == ["One year"] * 3


def test_a_log_of_tables_and_images_reads_each_row_as_what_it_is(store_url):
    from kd_ops.prediction_log.protocol import prediction_batch

    insert(store_url, table_rows(RECORDS[:2]))
    log = PredictionLog.open_sync(store_url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    log.write(predictions, prediction_batch("img", "1", x, np.full((2, 3), 1 / 3, np.float32), [{}] * 2))
    log.close()
    frame = read_predictions(store_url)
    by_model = dict(zip(frame["model_name"], frame["inputs"]))
    assert by_model["t"] == RECORDS[1] and by_model["img"] == [4.0, 5.0, 6.0, 7.0]
    assert read_predictions(store_url, model_name="img")["inputs"].tolist() == x.tolist()


@pytest.mark.parametrize(
    "record, why",
    [
        ({"tenure": [1, 2]}, "holds a record whose field 'tenure' is a list, not a single value"),
        ({"contract": {"kind": "x"}}, "holds a record whose field 'contract' is a dict, not a single value"),
    ],
)
def test_a_record_that_is_not_flat_names_its_row(store_url, record, why):
    rows = table_rows([RECORDS[0], record])
    insert(store_url, rows)
    with pytest.raises(StoredValueError, match=f"column inputs, row id='{rows[1]['id']}': {why}"):
        read_predictions(store_url, model_name="t")


def test_float_rows_are_still_checked_beside_records(store_url):
    """A numbers row holding null (a NaN when it was written) is refused even when records share the window."""
    rows = table_rows(RECORDS[:1]) + table_rows([{}])
    rows[1]["inputs"] = [0.5, None]
    insert(store_url, rows)
    with pytest.raises(StoredValueError, match=f"row id='{rows[1]['id']}': holds null where a number belongs"):
        read_predictions(store_url)
