"""Text end to end on the bundled Rotten Tomatoes snippets: a transformer teacher distilled into a
bag-of-embeddings student; the registered model takes raw strings (the tokenizer travels inside
it), per-slice accuracy by text length, and `kd-ops serve` answers text records on real HTTP and
logs the text as sent; the monitor tests a text column through Evidently's text descriptors and
finds typos, new words and plot summaries among reviews, but not clean traffic; re-distillation
trains a candidate on logged texts labelled by the teacher. Real MLflow
(SQLite), a real server process, real Evidently reports."""

from __future__ import annotations

import sqlite3
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from kd_ops.config.loading import config_from_dict
from kd_ops.pipeline.distillation import run_distillation

from ..servers import ServerProcess, free_port

pytestmark = pytest.mark.slow

NAME = "rt-text"
TEXT_RAW: dict = {}  # the fixture's config, for the re-distillation test
EMBEDDING: dict[str, dict] = {}  # scenario -> the monitor's metrics, through `run_monitor`


@pytest.fixture(scope="module")
def text_run(tracking_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    raw = {
        "data": {"name": "rotten-tomatoes", "rows": 2000, "max_length": 48, "vocab_size": 2000},
        "teacher": {"model": "transformer", "params": {"dim": 32, "layers": 1, "heads": 2, "ff": 64}, "epochs": 2},
        "student": {"model": "embedding_bag", "params": {"dim": 16, "bigram_buckets": 2000}, "epochs": 3},
        "tracking": {"uri": tracking_uri, "experiment": "text"},
        "registry": {"name": NAME},
        "evaluation": {"latency_repeats": 5, "throughput_repeats": 2, "throughput_batches": [1, 32], "edge": []},
        "train": {"progress_bar": False},
        "distill": {"cache": {"dir": str(root / "cache")}},
        "gates": {},
    }
    TEXT_RAW.update(raw)
    return run_distillation(config_from_dict(raw, "text")), tracking_uri, root


def test_teacher_baseline_and_student_get_the_same_metrics_and_text_length_slices(text_run):
    result, _, _ = text_run
    m = result.metrics
    for role in ("teacher", "baseline", "student"):
        assert 0.5 < m[role]["test_accuracy"] <= 1.0, role
        assert {"test_f1_macro", "latency_ms_p50", "throughput_per_s"} <= set(m[role]), role
    slices = {k for k in m["student"] if k.startswith("test_accuracy_slice_text_")}
    assert {
        "test_accuracy_slice_text_low",
        "test_accuracy_slice_text_mid",
        "test_accuracy_slice_text_high",
    } <= slices, sorted(m["student"])


def test_the_registered_model_takes_raw_strings(text_run):
    result, uri, _ = text_run
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(result.registered["model_uri"])
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text"]
    texts = ["a dull, lifeless mess.", "brilliant, moving and funny", "", None, "long " * 400]
    labels = model.predict(pd.DataFrame({"text": texts}))
    assert set(labels) <= {"fresh", "rotten"} and len(labels) == 5
    proba = model.get_raw_model().predict_proba(pd.DataFrame({"text": texts}))
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(proba[2], proba[3])  # empty and missing are the same (no text)


def test_serve_answers_text_records_and_logs_the_text(text_run):
    result, uri, root = text_run
    port = free_port()
    db = root / "log.db"
    cmd = [sys.executable, "-m", "kd_ops.cli", "serve", NAME, "--port", str(port), "--store", f"sqlite:///{db}"]
    proc = ServerProcess([*cmd, "--tracking-uri", uri], root / "serve.log", env={"KD_OPS_TOKEN": "t-123"})
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", lambda r: r.status_code == 200)
        records = [{"text": "a dull, lifeless mess."}, {"text": ""}, {"text": None}]
        r = requests.post(f"{url}/predict", json={"records": records}, timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert {p["class"] for p in preds} <= {"fresh", "rotten"} and len(preds) == 3
        bad = requests.post(f"{url}/predict", json={"records": [{"text": 5}]}, timeout=30)
        assert bad.status_code == 422 and bad.json()["field"] == "records[0].text", bad.text
        mlflow_format = {"dataframe_split": {"columns": ["text"], "data": [["a fine film"]]}}
        assert requests.post(f"{url}/invocations", json=mlflow_format, timeout=30).status_code == 200
        # Texts beyond max_length (48 tokens) are cut and counted, per column, in Prometheus' exposition.
        long = [{"text": "a long, long review " * 30}, {"text": "short"}, {"text": "and long " * 60}]
        assert requests.post(f"{url}/predict", json={"records": long}, timeout=30).status_code == 200
        exposition = requests.get(f"{url}/metrics", timeout=30).text
        assert 'kd_ops_truncated_texts_total{column="text"} 2.0' in exposition, exposition
    finally:
        proc.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT inputs, slices FROM kd_ops_predictions").fetchall()
    assert '{"text":"a dull, lifeless mess."}' in [r[0] for r in rows]
    assert any('"empty"' in r[1] for r in rows)


@pytest.mark.parametrize(
    "scenario, moved",
    [
        ("clean", set()),
        ("typos", {"unknown_token_share"}),
        ("new_words", {"unknown_token_share"}),
        ("plots", {"length"}),
    ],
)
def test_the_monitor_reads_text_drift_from_its_descriptors(text_run, tmp_path, scenario, moved):
    from kd_ops.config.monitoring import MonitorConfig
    from kd_ops.data.scenarios import sample
    from kd_ops.evaluation.reference import load_reference
    from kd_ops.models.loading import load_model
    from kd_ops.prediction_log.store import open_store, predictions
    from monitors.decision import judge
    from monitors.monitor import run_monitor
    from monitors.window import load_window

    from ..conftest import table_log_rows

    result, uri, _ = text_run
    dm = result.datamodule
    version = result.registered["version"]
    model = load_model(f"models:/{NAME}/{version}")
    x, _ = sample(dm, scenario, 400, seed=5)
    frame = dm.schema.decode(x)
    store = f"sqlite:///{tmp_path}/log.db"
    cut = dm.input_slices().compute(x)
    rows = table_log_rows(NAME, version, frame, model.predict_proba(frame), [{"text": t} for t in cut["text"]])
    engine = open_store(store)
    with engine.begin() as conn:
        conn.execute(predictions.insert(), rows)
    engine.dispose()
    ref = load_reference(NAME, version, uri)
    window = load_window(store, NAME, ref.x.shape[1], 2, rows=1000, schema=ref.schema, slicer=ref.input_slicer())
    out = judge(window, ref, MonitorConfig(store=store))
    EMBEDDING[scenario] = run_monitor(
        config_from_dict({**TEXT_RAW, "monitor": {"store": store, "workspace": None}}, "text"), record=False
    ).metrics
    text = out.columns["text"]
    assert text["kind"] == "text" and set(text["descriptors"]) == {"length", "non_letter_pct", "unknown_token_share"}
    drifted = {d for d, v in text["descriptors"].items() if v["drifted"]}
    assert moved <= drifted and text["drifted"] == bool(moved), text
    assert "drift_score_text.length" in out.metrics


def test_the_monitor_loads_the_served_network_for_embedding_drift():
    """`run_monitor` hooks the served student's head (`kd_ops.models.embedding`): its embeddings of
    made-up words tell them from the reference's reviews; clean traffic's do not. (Plot summaries
    move this small student's pooled embeddings too little, p about 0.06: the length descriptor
    is what flags them.)"""
    if set(EMBEDDING) != {"clean", "typos", "new_words", "plots"}:
        pytest.skip("needs the four monitor scenarios above")
    p = {scenario: m["embedding_drift_p_value"] for scenario, m in EMBEDDING.items()}
    assert p["clean"] > 0.001 and p["new_words"] < 0.001, p
    assert all(0 <= m["embedding_drift"] < 0.5 for m in EMBEDDING.values())


def test_redistillation_trains_a_candidate_on_logged_texts_labelled_by_the_teacher(text_run, tmp_path):
    from kd_ops.data.scenarios import sample
    from kd_ops.models.loading import load_model
    from kd_ops.pipeline.redistill import run_redistillation
    from kd_ops.prediction_log.store import open_store, predictions
    from kd_ops.registry.tracking import open_tracking

    from ..conftest import table_log_rows

    result, uri, _ = text_run
    dm = result.datamodule
    version = result.registered["version"]
    open_tracking(uri).set_registered_model_alias(NAME, "champion", version)
    frame = dm.schema.decode(sample(dm, "typos", 300, seed=9)[0])
    store = f"sqlite:///{tmp_path}/log.db"
    rows = table_log_rows(NAME, version, frame, load_model(f"models:/{NAME}/{version}").predict_proba(frame))
    engine = open_store(store)
    with engine.begin() as conn:
        conn.execute(predictions.insert(), rows)
    engine.dispose()
    raw = {
        **TEXT_RAW,
        "monitor": {"store": store, "workspace": None},
        "redistill": {"production_rows": 300, "max_reference_drop": 1.0, "min_recent_gain": -1.0},
    }
    out = run_redistillation(config_from_dict(raw, "text"), trigger="test: text drift")
    assert out.candidate_version is not None and out.rows["teacher_labels"] == out.rows["production_rows"] == 300
    assert set(out.accuracy["recent"]) == {"champion", "candidate"}
