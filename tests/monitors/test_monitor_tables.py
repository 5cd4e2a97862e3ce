"""The monitor on a table model: a real churn student registered in MLflow, windows of raw records
written to a real SQLite log as a table model's server stores them, real Evidently reports.

Drift is tested per column with the test Evidently picks for the column's type; categories the
training split never held are their own signal; slices are the user's columns (`contract`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kd_ops.config.monitoring import MonitorConfig
from kd_ops.evaluation.reference import Reference, load_reference
from kd_ops.prediction_log.feedback import feedback_rows
from kd_ops.prediction_log.store import feedback, open_store, predictions
from monitors.decision import judge
from monitors.window import WindowError, load_window, window_from_frame

from ..conftest import client_records, table_log_rows
from ..tables_fixtures import CHURN_NAME as NAME


@pytest.fixture(scope="module")
def churn(churn_champion, tracking_uri):
    """The session's churn student (LightGBM teacher, registered as a kd-ops table model) and its reference."""
    from kd_ops.models.loading import load_model
    from kd_ops.registry.tracking import open_tracking

    open_tracking(tracking_uri)  # models:/ URIs (and served_schema below) resolve in the session's MLflow
    result, version = churn_champion.result, churn_champion.version
    dm = result.datamodule
    return {
        "raw": churn_champion.raw,
        "root": churn_champion.root,
        "result": result,
        "version": version,
        "model": load_model(f"models:/{NAME}/{version}"),
        "reference": load_reference(NAME, version, tracking_uri),
        "test": dm.table.frame.iloc[dm.splits.test].reset_index(drop=True),
        "labels": dm.arrays("test")[1],
    }


def _log(churn, store: str, frame: pd.DataFrame, labels: np.ndarray | None = None, slices: bool = True) -> list[str]:
    """The served model's answers to `frame`, written to the log as the server stores a table
    model's rows (records, probabilities, the slicer's slices); feedback labels where given."""
    model, dm = churn["model"], churn["result"].datamodule
    probs = model.predict_proba(frame)
    cut = dm.input_slices().compute(model.schema.encode(frame))
    row_slices = [{k: str(v[i]) for k, v in cut.items()} if slices else {} for i in range(len(frame))]
    rows = table_log_rows(NAME, churn["version"], frame, probs, row_slices)
    engine = open_store(store)
    try:
        with engine.begin() as conn:
            conn.execute(predictions.insert(), rows)
            if labels is not None:
                conn.execute(feedback.insert(), feedback_rows([(r["id"], int(y)) for r, y in zip(rows, labels)]))
    finally:
        engine.dispose()
    return [r["id"] for r in rows]


def _window(churn, store: str):
    ref = churn["reference"]
    return load_window(
        store,
        NAME,
        ref.x.shape[1],
        ref.probabilities.shape[1],
        rows=1000,
        schema=ref.schema,
        slicer=ref.input_slicer(),
    )


def _drifted(frame: pd.DataFrame) -> pd.DataFrame:
    """Longer-tenure, pricier customers on monthly fibre contracts: two numeric, two categorical columns move."""
    out = frame.copy()
    out["tenure"] = out["tenure"] + 36
    out["monthly_charges"] = out["monthly_charges"] * 1.6
    out["contract"] = np.where(np.arange(len(out)) % 10 < 9, "Month-to-month", out["contract"])
    out["internet_service"] = np.where(np.arange(len(out)) % 10 < 8, "Fiber optic", out["internet_service"])
    return out


def test_the_reference_of_a_table_holds_its_typed_columns(churn, tmp_path):
    ref: Reference = churn["reference"]
    dm = churn["result"].datamodule
    assert ref.schema == dm.schema and ref.slicer == dm.input_slices().to_dict()
    assert list(ref.frame.columns) == list(dm.schema.names) and len(ref.frame) == len(ref.x)
    assert ref.frame["tenure"].dtype == np.float64 and isinstance(ref.frame["contract"].dtype, pd.CategoricalDtype)
    val = dm.table.frame.iloc[dm.splits.val].reset_index(drop=True)
    assert ref.frame["contract"].astype(str).tolist() == val["contract"].astype(str).tolist()  # the user's values
    np.testing.assert_allclose(ref.frame["tenure"], val["tenure"])
    assert set(ref.slices) == {"contract", "internet_service"}

    ref.save(tmp_path / "r.npz")
    back = Reference.load(tmp_path / "r.npz")
    pd.testing.assert_frame_equal(back.frame, ref.frame)
    assert back.schema == ref.schema and back.slicer == ref.slicer

    # A reference stored before references kept tables still loads; its columns decode from x.
    with np.load(tmp_path / "r.npz", allow_pickle=False) as data:
        old = {k: data[k] for k in data.files if not k.startswith(("table_", "slicer"))}
    np.savez_compressed(tmp_path / "old.npz", **old)
    legacy = Reference.load(tmp_path / "old.npz")
    assert legacy.schema is None and legacy.frame is None and legacy.slicer is None and legacy.table is None
    np.testing.assert_array_equal(legacy.x, ref.x)


def test_drifted_columns_are_named_with_the_test_evidently_chose(churn, tmp_path, tracking_uri):
    import mlflow

    from kd_ops.config.loading import config_from_dict
    from monitors.monitor import run_monitor

    store = f"sqlite:///{tmp_path}/predictions.db"
    _log(churn, store, _drifted(churn["test"]))
    raw = {**churn["raw"], "monitor": {"store": store, "workspace": None}}
    out = run_monitor(config_from_dict(raw, "churn"), notify=False)

    columns = out.columns
    assert list(columns) == list(churn["model"].schema.names)
    # The reference has 225 rows (<= 1000): Evidently's p-value tests, by column type and distinct values.
    assert columns["tenure"]["test"] == columns["monthly_charges"]["test"] == "K-S p_value"
    assert columns["contract"]["test"] == columns["internet_service"]["test"] == "chi-square p_value"
    assert columns["partner"]["test"] == "Z-test p_value"  # a 0/1 column: two values
    for name in ("tenure", "monthly_charges", "contract", "internet_service"):
        assert columns[name]["drifted"] and columns[name]["score"] < 0.05 and columns[name]["threshold"] == 0.05
        assert out.metrics[f"drift_score_{name}"] == columns[name]["score"]
    assert not columns["partner"]["drifted"] and not columns["payment_method"]["drifted"]  # unchanged columns
    reason = next(r for r in out.reasons if r.signal == "drift_share")
    assert {"tenure", "monthly_charges", "contract", "internet_service"} <= set(reason.columns)
    assert "contract" in reason.message and out.status == "alert"
    assert out.metrics["slice_drift"] > 0.2  # the contract slice's share moved with the column

    # Recorded: metrics under MLflow-safe names, the per-column verdicts in the result JSON.
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(out.run_id)
    assert run.data.metrics["drift_score_tenure"] == pytest.approx(columns["tenure"]["score"])
    saved = json.loads(open(client.download_artifacts(out.run_id, "monitor_result.json")).read())
    assert saved["columns"]["contract"]["test"] == "chi-square p_value"
    report = json.loads(open(client.download_artifacts(out.run_id, "evidently/drift.json")).read())
    assert any("ValueDrift(column=contract" in m["metric_name"] for m in report["metrics"])


def test_clean_traffic_drifts_few_columns(churn, tmp_path):
    store = f"sqlite:///{tmp_path}/predictions.db"
    _log(churn, store, churn["test"])
    out = judge(_window(churn, store), churn["reference"], MonitorConfig(store=store))
    assert out.metrics["drift_share"] < 0.3 and "drift_share" not in {r.signal for r in out.reasons}
    assert not any(out.columns[c]["drifted"] for c in ("tenure", "monthly_charges", "contract", "internet_service"))
    assert out.metrics["unseen_category_share"] == 0.0 and out.status == "ok", out.reasons


def test_unseen_categories_raise_their_own_signal_naming_the_columns(churn, tmp_path):
    store = f"sqlite:///{tmp_path}/predictions.db"
    frame = churn["test"].copy()
    n = len(frame)
    frame["payment_method"] = np.where(np.arange(n) % 5 == 0, "Crypto wallet", frame["payment_method"])
    frame["contract"] = np.where(np.arange(n) % 25 == 1, "Ten year", frame["contract"])
    _log(churn, store, frame)
    window = _window(churn, store)
    assert window.unseen["payment_method"].sum() == len(range(0, n, 5))
    assert window.describe()["unseen_category_rows"] == len(range(0, n, 5)) + len(range(1, n, 25))

    out = judge(window, churn["reference"], MonitorConfig(store=store))
    share = (len(range(0, n, 5)) + len(range(1, n, 25))) / n
    assert out.metrics["unseen_category_share"] == pytest.approx(share)
    assert out.metrics["unseen_category_share_payment_method"] == pytest.approx(len(range(0, n, 5)) / n)
    assert out.metrics["unseen_category_share_internet_service"] == 0.0
    (reason,) = [r for r in out.reasons if r.signal == "unseen_category_share"]
    assert reason.status == "alert" and reason.threshold == 0.10 and reason.columns == ("payment_method", "contract")
    assert "columns: payment_method, contract" in reason.message
    assert out.columns["payment_method"]["unseen_share"] == pytest.approx(0.2, abs=0.01)
    # Unseen values are missing to the model: drift is tested on the values it knows, not alarmed twice.
    assert not out.columns["payment_method"]["drifted"]

    lenient = MonitorConfig.model_validate(
        {"store": store, "thresholds": {"unseen_category_share": {"warn": 0.2, "alert": 0.5}}}
    )
    out = judge(window, churn["reference"], lenient)
    assert [r.status for r in out.reasons if r.signal == "unseen_category_share"] == ["warn"]


def test_slice_accuracy_on_the_users_column_after_feedback(churn, tmp_path):
    """Labels arrive; on one contract type the model is now mostly wrong: that slice's accuracy,
    on its own rows, drops while the others hold. Half the rows were logged without slices (the
    slicer stored with the student cuts them the same way)."""
    store = f"sqlite:///{tmp_path}/predictions.db"
    frame, labels = churn["test"], churn["labels"].copy()
    monthly = (frame["contract"] == "Month-to-month").to_numpy()
    answers = churn["model"].predict_proba(frame).argmax(axis=1)
    wrong = monthly & (np.arange(len(labels)) % 4 != 0)
    labels[wrong] = 1 - answers[wrong]  # the customers of one contract type changed their minds
    half = len(frame) // 2
    _log(churn, store, frame.iloc[:half], labels[:half])
    _log(churn, store, frame.iloc[half:], labels[half:], slices=False)
    window = _window(churn, store)
    expected = churn["result"].datamodule.input_slices().compute(window.x)["contract"]
    assert window.slices["contract"].tolist() == expected.tolist()

    cfg = MonitorConfig(store=store, min_labelled_rows=100, min_slice_rows=30)
    out = judge(window, churn["reference"], cfg)
    pred = window.predicted
    for level in ("Month-to-month", "One year", "Two year"):
        rows = expected == level
        assert out.metrics[f"accuracy_slice_contract_{level}"] == pytest.approx((pred[rows] == labels[rows]).mean())
    drops = {lv: out.metrics[f"accuracy_drop_slice_contract_{lv}"] for lv in ("Month-to-month", "One year", "Two year")}
    assert drops["Month-to-month"] > max(drops["One year"], drops["Two year"]) + 0.1, drops
    assert out.metrics["slice_accuracy_drop"] == pytest.approx(drops["Month-to-month"])
    reason = next(r for r in out.reasons if r.signal == "slice_accuracy_drop")
    assert reason.status == "alert" and out.metrics["slice_accuracy_drop_p_value"] < cfg.rate_p_value
    assert out.snapshots["quality"] is not None


def test_a_window_of_records_needs_the_schema(churn, tmp_path):
    from monitors.window import read_window, served_schema

    store = f"sqlite:///{tmp_path}/predictions.db"
    _log(churn, store, churn["test"].iloc[:5])
    frame = read_window(store, NAME)
    with pytest.raises(
        WindowError, match="holds a record \\(a table row\\) but the served version has no table schema"
    ):
        window_from_frame(frame, NAME, 19, 2)
    # A reference without the schema: the monitor reads it from the model version instead.
    schema = served_schema(NAME, churn["version"])
    assert schema == churn["reference"].schema
    bad = frame.copy()
    bad.at[2, "inputs"] = {**bad.at[2, "inputs"], "tenure": "long"}
    with pytest.raises(WindowError, match=f"column 'tenure' is numeric but row 2 \\(index '{bad.at[2, 'id']}'\\)"):
        window_from_frame(bad, NAME, 19, 2, schema=schema)


# -- which test Evidently picks, on a small table with every kind of column ---------------------------


def _synthetic(rows: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "amount": rng.normal(shift, 1.0, rows),
            "member": rng.random(rows) < 0.3 + shift / 4,
            "colour": rng.choice(["red", "green", "blue"], rows, p=[0.5, 0.3, 0.2]),
            "note": rng.choice(["a", "b", "c", "d"], rows),
            "y": rng.integers(0, 2, rows),
        }
    )


def _synthetic_case(ref_rows: int, shift: float):
    from kd_ops.data.tables import TableSpec, fit_schema, label_classes

    train = _synthetic(2000, 0)
    classes, _ = label_classes(train["y"], "train")
    features = ["amount", "member", "colour", "note"]
    schema = fit_schema(train, TableSpec(label="y"), features, np.arange(len(train)), classes, "train")
    ref_x = schema.encode(_synthetic(ref_rows, 1))
    rng = np.random.default_rng(2)
    reference = Reference(
        ref_x,
        rng.integers(0, 2, ref_rows),
        rng.dirichlet([1, 1], ref_rows).astype(np.float32),
        schema=schema,
        frame=schema.decode(ref_x),
    )
    current = _synthetic(400, 3, shift)
    current.loc[:, "note"] = None  # a field no client sends any more
    n = len(current)
    frame = pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(n)],
            "created_at": pd.Timestamp("2026-01-01"),
            "model_version": "1",
            "inputs": client_records(current[features]),
            "probabilities": list(rng.dirichlet([1, 1], n)),
            "predicted_class": 0,
            "confidence": 0.5,
        }
    )
    return reference, window_from_frame(frame, "m", 4, 2, schema=schema)


@pytest.mark.parametrize(
    "ref_rows, numeric, boolean, categorical",
    [
        (600, "K-S p_value", "Z-test p_value", "chi-square p_value"),
        (1500, "Wasserstein distance (normed)", "Jensen-Shannon distance", "Jensen-Shannon distance"),
    ],
)
def test_evidently_picks_the_test_by_column_type_and_reference_size(ref_rows, numeric, boolean, categorical):
    from monitors.signals import drift_report

    reference, window = _synthetic_case(ref_rows, shift=1.0)
    assert window.schema.column("member").kind == "boolean" and window.table["member"].dtype == "boolean"
    _, metrics, columns = drift_report(window, reference, 0.05)
    assert (columns["amount"]["test"], columns["member"]["test"], columns["colour"]["test"]) == (
        numeric,
        boolean,
        categorical,
    )
    assert columns["amount"]["drifted"] and not columns["colour"]["drifted"]
    assert columns["amount"]["threshold"] == (0.05 if ref_rows <= 1000 else 0.1)  # Evidently's own for distances
    # Every value of `note` missing in the window: drifted, with no test to run on nothing.
    assert (
        columns["note"]["drifted"]
        and columns["note"]["test"] is None
        and "no value in the window" in columns["note"]["note"]
    )
    drifted = sum(c["drifted"] for c in columns.values())
    assert metrics["drift_share"] == drifted / 4 and metrics["drifted_columns"] == drifted


def test_metric_names_are_made_safe_for_mlflow():
    from monitors.recording import metric_names

    out = metric_names(
        {"accuracy_slice_pay_Credit card (automatic)": 0.5, "accuracy_slice_pay_Credit card _automatic_": 1}
    )
    assert out == {
        "accuracy_slice_pay_Credit card _automatic_": 0.5,
        "accuracy_slice_pay_Credit card _automatic__2": 1.0,
    }
