"""Users' tables: typed columns, the lossless encoding, splits by time, and bad input named by column and row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kd_ops.config.training import DataConfig
from kd_ops.core.errors import ConfigError
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.data.tables import TableSchema, read_table_file
from kd_ops.models.zoo import build_model


def _frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    carrier = rng.choice(["UA", "AA", "DL", "B6"], n, p=[0.4, 0.3, 0.28, 0.02])
    distance = rng.integers(100, 3000, n)
    rush = rng.random(n) < 0.3
    hour = rng.uniform(5, 23, n)
    score = (carrier == "UA") * 1.0 + hour / 12 + rush - 1.2 + rng.normal(0, 0.3, n)
    frame = pd.DataFrame(
        {
            "carrier": carrier,
            "distance": distance,
            "hour": hour,
            "rush": rush,
            "when": pd.date_range("2013-01-01", periods=n, freq="h"),
            "late": np.where(score > 0.5, "yes", "no"),
        }
    )
    frame.loc[3, "hour"] = np.nan
    frame.loc[5, "carrier"] = None
    return frame


def _dm(frame: pd.DataFrame, **data) -> DistillDataModule:
    dm = DistillDataModule(DataConfig(label="late", **data), seed=0, frame=frame)
    dm.setup()
    return dm


def test_kinds_are_inferred_and_overridable_and_labels_stay_the_users():
    dm = _dm(_frame(), time="when", slices=["carrier"])
    kinds = {c.name: c.kind for c in dm.schema.columns}
    assert kinds == {"carrier": "categorical", "distance": "numeric", "hour": "numeric", "rush": "boolean"}
    assert dm.schema.classes == ("no", "yes")
    assert set(dm.slices("test")["label"]) <= {"no", "yes"}
    over = _dm(_frame(), time="when", categorical=["distance"])
    assert over.schema.column("distance").kind == "categorical"


def test_encoding_is_lossless_and_decodes_to_the_users_columns_and_types():
    frame = _frame()
    dm = _dm(frame, time="when")
    schema = dm.schema
    x = schema.encode(frame)
    back = schema.decode(x)
    assert list(back.columns) == ["carrier", "distance", "hour", "rush"]
    assert isinstance(back["carrier"].dtype, pd.CategoricalDtype)
    assert back["carrier"].astype(object).where(back["carrier"].notna(), None).tolist() == frame["carrier"].tolist()
    np.testing.assert_allclose(back["distance"].to_numpy(), frame["distance"].to_numpy())
    assert np.isnan(x[3, schema.position("hour")]) and np.isnan(x[5, schema.position("carrier")])
    again = schema.encode(back)
    np.testing.assert_array_equal(np.isnan(again), np.isnan(x))
    np.testing.assert_allclose(np.nan_to_num(again, nan=-1), np.nan_to_num(x, nan=-1))


def test_unseen_categories_read_as_missing_and_are_counted():
    dm = _dm(_frame(), time="when")
    rows = pd.DataFrame({"carrier": ["ZZ", "UA"], "distance": [500, 600], "hour": [8.0, 9.0], "rush": [True, False]})
    x = dm.schema.encode(rows)
    assert np.isnan(x[0, dm.schema.position("carrier")]) and not np.isnan(x[1, dm.schema.position("carrier")])
    assert dm.schema.unseen(rows) == {"carrier": 1}


def test_rare_categories_share_one_embedding_and_missing_values_do_not_poison_the_network():
    dm = _dm(_frame(), time="when")
    col = dm.schema.column("carrier")
    assert col.counts[col.categories.index("B6")] < dm.schema.min_category_count  # B6 is rare here
    net = build_model("mlp", {"hidden": [8]}, dm.input_shape, dm.n_classes, table=dm.schema)
    front = net.normalize
    remap = getattr(front, f"remap_{dm.schema.position('carrier')}")
    assert int(remap[col.categories.index("B6") + 1]) == 1  # the shared "rare" row
    assert int(remap[0]) == 0  # missing and unseen
    out = net(torch.as_tensor(dm.raw.x[:10]))
    assert out.shape == (10, 2) and torch.isfinite(out).all()


def test_a_time_split_trains_on_the_past_and_tests_on_later_rows():
    frame = _frame().sample(frac=1.0, random_state=1)  # rows out of order: the split must sort them
    dm = _dm(frame, time="when", split="time")
    times = dm.table.times
    train_end = times[dm.splits.train].max()
    assert train_end < times[dm.splits.val].min() <= times[dm.splits.val].max() < times[dm.splits.test].min()


def test_random_split_is_stratified_and_fixed_by_the_seed():
    a, b = _dm(_frame()), _dm(_frame())
    np.testing.assert_array_equal(a.splits.test, b.splits.test)
    assert a.fingerprint() == b.fingerprint()


def test_schema_round_trips_through_json():
    import json

    schema = _dm(_frame(), time="when").schema
    again = TableSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert again == schema and again.encode(_frame()).shape == (400, 4)


# -- bad input: one ConfigError naming file, column and row ------------------------------------------


def test_a_misspelt_column_names_the_close_matches():
    with pytest.raises(ConfigError, match=r"data.label = 'lat': no such column .*did you mean 'late'"):
        DistillDataModule(DataConfig(label="lat"), 0, frame=_frame()).setup()
    with pytest.raises(ConfigError, match=r"data.slices.0 = 'carier'.*did you mean 'carrier'"):
        _dm(_frame(), slices=["carier"])


def test_a_label_with_one_class_is_refused():
    frame = _frame().assign(late="no")
    with pytest.raises(ConfigError, match="one class only"):
        _dm(frame)


def test_a_numeric_column_holding_text_names_the_column_and_the_first_row():
    frame = _frame()
    frame["distance"] = frame["distance"].astype(object)
    frame.loc[7, "distance"] = "far"
    with pytest.raises(ConfigError, match=r"column 'distance' is numeric but row 7 holds 'far'"):
        _dm(frame, numeric=["distance"])


def test_data_until_keeps_the_past_and_names_what_is_wrong():
    frame = _frame()  # hourly from 2013-01-01 00:00: 400 rows, the last on 2013-01-17 15:00
    dm = _dm(frame, time="when", split="time", until="2013-01-11")
    assert len(dm.raw.y) == 240  # ten days of hours
    with pytest.raises(ConfigError, match="data.until = '2013-01-11' needs data.time"):
        _dm(frame, until="2013-01-11")
    with pytest.raises(ConfigError, match="data.until = '2012-12-31': the DataFrame holds 0 rows before it"):
        _dm(frame, time="when", until="2012-12-31")
    with pytest.raises(ValueError, match="data.until = 'last spring' is not a time"):
        DataConfig(label="late", time="when", until="last spring")


def test_an_unparsable_time_names_the_row():
    frame = _frame()
    frame["when"] = frame["when"].astype(str)
    frame.loc[11, "when"] = "yesterday"
    with pytest.raises(ConfigError, match=r"data.time = 'when': .*row 11 holds 'yesterday'"):
        _dm(frame, time="when")


def test_a_missing_or_unreadable_file_is_one_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_table_file(tmp_path / "nope.csv")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read it as a table"):
        read_table_file(bad)


def test_records_missing_a_column_or_with_an_unknown_one_are_named():
    schema = _dm(_frame(), time="when").schema
    rows = pd.DataFrame({"carrier": ["UA"], "distanse": [3], "hour": [1.0], "rush": [True]})
    with pytest.raises(ConfigError, match=r"column 'distance' is missing \(did you mean 'distanse'"):
        schema.encode(rows, where="records")
    ok = pd.DataFrame({"carrier": ["UA"], "distance": [3], "hour": [1.0], "rush": [True], "extra": [1]})
    with pytest.raises(ConfigError, match="unknown column 'extra'"):
        schema.encode(ok, where="records", strict=True)
    schema.encode(ok, where="records")  # not strict: other columns (the label, ids) are ignored


def test_csv_and_parquet_files_read_alike(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    a = DistillDataModule(DataConfig(path=str(tmp_path / "t.csv"), label="late", time="when"), 0)
    b = DistillDataModule(DataConfig(path=str(tmp_path / "t.parquet"), label="late", time="when"), 0)
    a.setup(), b.setup()
    assert [c.kind for c in a.schema.columns] == [c.kind for c in b.schema.columns]
    np.testing.assert_array_equal(a.splits.test, b.splits.test)


def test_name_and_path_together_are_a_config_error():
    from kd_ops.config import config_from_dict

    with pytest.raises(ConfigError, match="give one of them"):
        config_from_dict({"data": {"name": "digits", "path": "t.csv", "label": "y"}})


@pytest.mark.parametrize("name,label,n_classes", [("churn", "churn", 2), ("flights", "late", 2)])
def test_bundled_tables_load_offline_with_their_tasks(name, label, n_classes):
    dm = DistillDataModule(DataConfig(name=name, rows=3000), 0)
    dm.setup()
    assert dm.schema.label == label and dm.n_classes == n_classes
    names = set(dm.schema.names)
    assert not names & {"arr_delay", "dep_delay", "dep_time", "arr_time", "air_time", "rownames"}  # no leaks, no ids
    assert set(dm.schema.slices) <= names
