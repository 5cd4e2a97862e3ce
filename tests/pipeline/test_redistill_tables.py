"""Re-distillation of a table model: the log's raw records become encoded rows under the
champion's schema, labelled by feedback where it arrived and by the lineage teacher (a LightGBM
model behind `EstimatorTeacher`) elsewhere; a real churn champion, MLflow and SQLite log."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kd_ops.core.errors import ConfigError
from kd_ops.pipeline.redistill import logged_rows

from ..conftest import table_log_rows
from ..tables_fixtures import CHURN_NAME as NAME


@pytest.fixture(scope="module")
def champion(churn_champion, tmp_path_factory):
    """The session's churn student as @champion, and a log of 400 of its answers on shifted traffic
    (two unseen payment methods among them), every other row with a feedback label."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.models.loading import load_model
    from kd_ops.prediction_log.feedback import feedback_rows
    from kd_ops.prediction_log.store import feedback, open_store, predictions

    root = tmp_path_factory.mktemp("redistill-tables")
    store = f"sqlite:///{root}/predictions.db"
    raw = {
        **churn_champion.raw,
        "tracking": {**churn_champion.raw["tracking"], "experiment": "redistill-tables"},
        "monitor": {"store": store, "workspace": None},
        "redistill": {"production_rows": 400, "max_reference_drop": 1.0, "min_recent_gain": -1.0},
    }
    cfg = config_from_dict(raw, "churn")
    churn_champion.pin_champion()  # also points this process's MLflow at the session's store
    result = churn_champion.result
    dm = result.datamodule
    rows = np.concatenate([dm.splits.test, dm.splits.val])[:400]
    frame = dm.table.frame.iloc[rows].reset_index(drop=True)
    frame["monthly_charges"] = frame["monthly_charges"] * 1.3
    frame.loc[[3, 7], "payment_method"] = "Crypto wallet"
    labels = dm.raw.y[rows]
    model = load_model(f"models:/{NAME}/{result.registered['version']}")
    probs = model.predict_proba(frame)
    logged = table_log_rows(NAME, result.registered["version"], frame, probs)
    engine = open_store(store)
    with engine.begin() as conn:
        conn.execute(predictions.insert(), logged)
        conn.execute(feedback.insert(), feedback_rows([(r["id"], int(y)) for r, y in zip(logged[::2], labels[::2])]))
    engine.dispose()
    return {"cfg": cfg, "result": result, "frame": frame, "labels": labels}


def _loaded(cfg, dm):
    """The teachers and the champion as `run_redistillation` loads them."""
    from kd_ops.models.loading import load_for_data
    from kd_ops.pipeline.redistill import teacher_uri_of
    from kd_ops.registry.tracking import open_tracking

    client = open_tracking(cfg.tracking.uri)
    uri = teacher_uri_of(client, NAME, "1")
    teachers = [load_for_data(u, dm, "teacher") for u in uri.split(",")]
    return teachers, load_for_data(f"models:/{NAME}/1", dm, "champion")


def test_logged_records_are_encoded_with_the_champions_schema(champion):
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.models.estimators import EstimatorTeacher
    from kd_ops.pipeline.redistill import production_set, table_schema, teacher_classes

    cfg = champion["cfg"]
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    teachers, champion_model = _loaded(cfg, dm)
    assert isinstance(teachers[0], EstimatorTeacher)  # the LightGBM teacher, over encoded rows
    schema = table_schema(dm, champion_model, NAME, "1")
    assert schema == champion_model.schema == dm.schema  # read directly: the same encoding

    prod = production_set(cfg, teachers, dm.n_features, dm.n_classes, schema)
    expected = schema.encode(champion["frame"], strict=False)
    np.testing.assert_array_equal(prod.x, expected)  # NaN where equal: the unseen payment methods
    assert np.isnan(prod.x[[3, 7], schema.position("payment_method")]).all()
    labelled = np.arange(400) % 2 == 0
    assert (prod.from_feedback == labelled).all() and prod.counts()["feedback_labels"] == 200
    np.testing.assert_array_equal(prod.y[labelled], champion["labels"][labelled])
    np.testing.assert_array_equal(prod.y[~labelled], teacher_classes(teachers, expected)[~labelled])
    assert prod.holdout.sum() == 100


def test_a_champion_of_another_table_is_refused(champion):
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.pipeline.redistill import table_schema

    cfg = champion["cfg"]
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    _, champion_model = _loaded(cfg, dm)
    fewer = DistillDataModule(
        cfg.data.model_copy(update={"features": ["tenure", "contract", "internet_service"]}), cfg.seed
    )
    fewer.setup()
    with pytest.raises(ConfigError, match=f"{NAME} v1 was distilled on another table than data 'churn' \\(columns"):
        table_schema(fewer, champion_model, NAME, "1")


def test_logged_rows_take_records_and_float_rows():
    from kd_ops.data.tables import TableSpec, fit_schema, label_classes

    train = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "c": ["x", "y", "x", "y"], "y": [0, 1, 0, 1]})
    classes, _ = label_classes(train["y"], "t")
    schema = fit_schema(train, TableSpec(label="y"), ["a", "c"], np.arange(4), classes, "t")
    mixed = [{"a": 2.5, "c": "y", "extra": "ignored"}, [7.0, 0.0], {"a": None, "c": "new"}]
    x = logged_rows(mixed, 2, "m", schema)
    np.testing.assert_array_equal(x, np.array([[2.5, 1.0], [7.0, 0.0], [np.nan, np.nan]], np.float32))
    with pytest.raises(ConfigError, match="holds table records for 'm' but its data has no table schema"):
        logged_rows(mixed, 2, "m")
    with pytest.raises(ConfigError, match="have shape \\(1, 3\\); the dataset has 2 features"):
        logged_rows([[1.0, 2.0, 3.0]], 2, "m")


@pytest.mark.slow
def test_a_table_model_is_redistilled_on_its_logged_records(champion, tracking_uri):
    from kd_ops.evaluation.reference import load_reference
    from kd_ops.pipeline.redistill import TAG_REDISTILL, run_redistillation
    from kd_ops.registry.tracking import open_tracking

    out = run_redistillation(champion["cfg"], trigger="test: table drift")
    assert out.candidate_version is not None and out.champion_before == "1"
    assert out.rows == {"production_rows": 400, "feedback_labels": 200, "teacher_labels": 200, "holdout_rows": 100}
    assert set(out.accuracy["recent"]) == {"champion", "candidate"}
    version = open_tracking(tracking_uri).get_model_version(NAME, out.candidate_version)
    assert version.tags[TAG_REDISTILL] == "1"
    # The candidate's reference is the held-out recent traffic, as typed columns too.
    ref = load_reference(NAME, out.candidate_version, tracking_uri)
    assert ref.split == "production" and len(ref.x) == 100 and list(ref.frame.columns) == list(ref.schema.names)
    assert ref.frame["monthly_charges"].mean() > champion["result"].datamodule.table.frame["monthly_charges"].mean()
