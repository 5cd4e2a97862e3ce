"""`kd-ops serve` of a table model (a student distilled on the bundled churn table): a real server
process on 127.0.0.1, a real MLflow registry (SQLite), the prediction log read from its SQLite file.

Clients send records keyed by the original columns; answers carry the user's labels ("Yes"/"No");
the log keeps each record as it was sent; MLflow's four scoring formats give the classes MLflow's
own loader gives; feedback takes the user's labels; the shadow teacher scores the encoded rows."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, given, settings

from ..servers import ServerProcess, free_port
from ..tables_fixtures import CHURN_NAME as NAME

pytestmark = pytest.mark.slow

TOKEN = "table-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def churn(churn_champion):
    """The session's churn student as NAME@champion, and test records in the user's own types."""
    from kd_ops.registry.tracking import open_tracking

    churn_champion.pin_champion()  # whatever the gates (or a re-distillation) said: serve this one
    result, version = churn_champion.result, churn_champion.version
    client = open_tracking(churn_champion.tracking_uri)
    frame = result.datamodule.table.frame.reset_index(drop=True).iloc[:40]
    teacher_uri = client.get_model_version(NAME, version).tags["kd_ops.teacher_model_uri"]
    return {
        "uri": churn_champion.tracking_uri,
        "version": version,
        "model_uri": result.registered["model_uri"],
        "frame": frame,
        "records": json.loads(frame.to_json(orient="records")),  # what a client's JSON holds
        "schema": result.datamodule.schema,
        "teacher_uri": teacher_uri,
    }


class Served:
    def __init__(self, proc: ServerProcess, url: str, db: Path):
        self.proc, self.url, self.db = proc, url, db

    def post(self, path: str, body, **kw) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=60, **kw)

    def logged(self, ids: list[str] | None = None) -> dict[str, dict]:
        """Rows of the log by prediction id, straight from the SQLite file (JSON columns decoded)."""
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM kd_ops_predictions").fetchall()
        out = {}
        for r in rows:
            row = dict(r)
            for key in ("inputs", "probabilities", "slices"):
                row[key] = json.loads(row[key])
            out[row["id"]] = row
        return out if ids is None else {i: out[i] for i in ids if i in out}

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def server(churn, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table-serve")
    port = free_port()
    db = tmp / "predictions.db"
    cmd = [sys.executable, "-m", "kd_ops.cli", "serve", NAME, "--port", str(port), "--store", f"sqlite:///{db}"]
    cmd += ["--tracking-uri", churn["uri"], "--shadow-fraction", "1.0"]
    proc = ServerProcess(cmd, tmp / "serve.log", env={"KD_OPS_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    proc.wait_healthy(f"{url}/health", lambda r: r.status_code == 200)
    yield Served(proc, url, db)
    proc.stop()


def _mlflow_labels(churn, frame: pd.DataFrame) -> list:
    import mlflow

    mlflow.set_tracking_uri(churn["uri"])
    return list(mlflow.pyfunc.load_model(churn["model_uri"]).predict(frame))


def test_records_answer_the_users_labels_and_the_log_keeps_each_record_as_sent(server, churn):
    records = churn["records"][:6]
    r = server.post("/predict", {"records": records, "slices": {"site": "berlin"}})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["class"] for p in preds] == _mlflow_labels(churn, churn["frame"].iloc[:6])
    assert {p["class"] for p in preds} <= {"No", "Yes"} and {p["model_version"] for p in preds} == {churn["version"]}
    probs = np.array([p["probabilities"] for p in preds])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [p["class"] for p in preds] == [["No", "Yes"][k] for k in probs.argmax(axis=1)]

    logged = server.logged([p["id"] for p in preds])
    assert len(logged) == 6
    for p, record in zip(preds, records):
        row = logged[p["id"]]
        assert row["inputs"] == record  # the JSON object as sent, not the encoded floats
        assert row["predicted_class"] == ["No", "Yes"].index(p["class"])
        assert row["slices"] == {
            "site": "berlin",
            "contract": record["contract"],
            "internet_service": record["internet_service"],
        }

    # A null is a missing value: answered, and logged as null.
    gap = {**records[0], "total_charges": None, "contract": None, "tenure": None}
    r = server.post("/predict", {"records": [gap]})
    assert r.status_code == 200, r.text
    row = server.logged([r.json()["predictions"][0]["id"]])[r.json()["predictions"][0]["id"]]
    assert row["inputs"] == gap and row["inputs"]["total_charges"] is None
    assert row["slices"]["contract"] == "missing"

    model = requests.get(f"{server.url}/model", timeout=10).json()
    assert model["input"] == "records" and model["classes"] == ["No", "Yes"] and model["n_classes"] == 2
    assert [c["name"] for c in model["columns"]] == list(churn["frame"].columns)
    assert {c["name"]: c["kind"] for c in model["columns"]}["contract"] == "categorical"
    assert model["slices"] == ["contract", "internet_service"]


def test_bad_records_are_422s_naming_the_record_and_the_column_and_nothing_is_logged(server, churn):
    good = churn["records"][0]
    before = len(server.logged())
    without_tenure = {k: v for k, v in good.items() if k != "tenure"}
    cases = [
        ({"records": [good, without_tenure]}, "records[1].tenure", "missing"),
        ({"records": [good, good, {**good, "tenure": "abc"}]}, "records[2].tenure", "numeric"),
        ({"records": [{**good, "monthly_charges": "12.5"}]}, "records[0].monthly_charges", "text"),
        ({"records": [good, {**good, "tenur": 3}]}, "records[1].tenur", "did you mean 'tenure'"),
        ({"records": [{**good, "female": True}]}, "records[0].female", "boolean"),
        ({"records": [{**good, "contract": ["a"]}]}, "records[0].contract", "a list"),
        ({"records": [{**good, "tenure": 1e39}]}, "records[0].tenure", "float32"),
        ({"records": [good, 3]}, "records[1]", "object"),
        ({"records": []}, "records", ""),
        ({"rows": [[0.0] * 19]}, "rows", "table model"),
        ({"rows": [[0.0] * 19], "records": [good]}, "body", "not both"),
        ({}, "records", "required"),
        ({"records": [good], "slices": {"contract": "x"}}, "slices.contract", "computed by the server"),
    ]
    for body, field, words in cases:
        r = server.post("/predict", body)
        assert r.status_code == 422, (field, r.text)
        assert r.json()["field"] == field, (field, r.json())
        assert field in r.json()["detail"] and words in r.json()["detail"], (words, r.json()["detail"])
    assert len(server.logged()) == before


def test_invocations_in_all_four_formats_give_mlflows_classes(server, churn):
    frame, records = churn["frame"].iloc[:5], churn["records"][:5]
    expected = _mlflow_labels(churn, frame)
    columns = list(frame.columns)
    shuffled = columns[::-1]  # a split names its columns: any order
    bodies = {
        "dataframe_split": {
            "dataframe_split": {"columns": shuffled, "data": [[r[c] for c in shuffled] for r in records]}
        },
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": [[r[c] for c in columns] for r in records]},  # lists: the signature's order
        "inputs": {"inputs": records},
        "pandas": {"dataframe_split": json.loads(frame.to_json(orient="split"))},  # index included, as pandas writes
    }
    probabilities = []
    for key, body in bodies.items():
        r = server.post("/invocations", body)
        assert r.status_code == 200, (key, r.text)
        out = r.json()
        assert [p["class"] for p in out["predictions"]] == expected, key
        assert out["prediction_ids"] == [p["prediction_id"] for p in out["predictions"]]
        probabilities.append([p["probabilities"] for p in out["predictions"]])
        logged = server.logged(out["prediction_ids"])
        assert [logged[i]["inputs"] for i in out["prediction_ids"]] == records, key
    for probs in probabilities[1:]:
        np.testing.assert_allclose(probs, probabilities[0], rtol=1e-6)

    bad = [
        ({"dataframe_split": {"columns": columns[:-1], "data": [[1] * 18]}}, "dataframe_split.columns"),
        ({"dataframe_split": {"columns": ["x", *columns[1:]], "data": [[1] * 19]}}, "dataframe_split.columns[0]"),
        (
            {"dataframe_split": {"columns": columns, "data": [[records[0][c] for c in columns][:-1]]}},
            "dataframe_split.data[0]",
        ),
        (
            {
                "dataframe_split": {
                    "columns": columns,
                    "data": [[*[records[0][c] for c in columns][:4], "abc", *[records[0][c] for c in columns][5:]]],
                }
            },
            "dataframe_split.data[0][4]",
        ),
        ({"instances": [[records[0][c] for c in columns][:-1]]}, "instances[0]"),
        ({"inputs": [records[0], {**records[1], "tenure": "x"}]}, "inputs[1].tenure"),
        ({"dataframe_records": [{**records[0], "extra": 1}]}, "dataframe_records[0].extra"),
        ({"inputs": records, "instances": records}, "body"),
        ({"inputs": None}, "body"),
    ]
    for body, field in bad:
        r = server.post("/invocations", body)
        assert r.status_code == 422 and r.json()["field"] == field, (field, r.text)


def test_feedback_takes_the_users_labels_and_stores_class_indices(server, churn):
    r = server.post("/predict", {"records": churn["records"][:3]})
    ids = [p["id"] for p in r.json()["predictions"]]
    ok = server.post(
        "/feedback",
        {"labels": [{"prediction_id": ids[0], "label": "Yes"}, {"prediction_id": ids[1], "label": "No"}]},
        headers=AUTH,
    )
    assert ok.status_code == 200 and ok.json() == {"stored": 2}, ok.text
    stored = dict(
        server.query(
            f"SELECT prediction_id, label FROM kd_ops_feedback WHERE prediction_id IN ('{ids[0]}', '{ids[1]}')"
        )
    )
    assert stored == {ids[0]: 1, ids[1]: 0}
    for label in ("Maybe", 1, True, None, "yes"):
        r = server.post(
            "/feedback",
            {"labels": [{"prediction_id": ids[2], "label": "No"}, {"prediction_id": ids[2], "label": label}]},
            headers=AUTH,
        )
        assert r.status_code == 422 and r.json()["field"] == "labels[1].label", (label, r.text)
        assert "['No', 'Yes']" in r.json()["detail"]
    replay = {"labels": [{"prediction_id": ids[2], "label": "Yes"}], "request_id": "churn-1"}
    assert server.post("/feedback", replay, headers=AUTH).json() == {"stored": 1}
    assert server.post("/feedback", replay, headers=AUTH).json() == {"stored": 1, "replayed": True}
    doc = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]["/feedback"]["post"]
    label = doc["requestBody"]["content"]["application/json"]["schema"]["properties"]["labels"]["items"]
    assert label["properties"]["label"]["enum"] == ["No", "Yes"]


def test_the_shadow_teacher_scores_the_encoded_rows_as_the_teacher_scores_the_records(server, churn):
    import mlflow

    records = churn["records"][10:16]
    r = server.post("/predict", {"records": records})
    ids = [p["id"] for p in r.json()["predictions"]]
    wanted = ",".join(repr(i) for i in ids)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sql = f"SELECT prediction_id, teacher_uri, predicted_class FROM kd_ops_shadow WHERE prediction_id IN ({wanted})"
        rows = server.query(sql)
        if len(rows) == len(ids):
            break
        time.sleep(0.2)
    assert len(rows) == len(ids), requests.get(f"{server.url}/health", timeout=10).json()["shadow"]
    assert {uri for _, uri, _ in rows} == {churn["teacher_uri"]}
    mlflow.set_tracking_uri(churn["uri"])
    teacher = mlflow.pyfunc.load_model(churn["teacher_uri"]).predict(churn["frame"].iloc[10:16])
    by_id = {pid: k for pid, _, k in rows}
    assert [["No", "Yes"][by_id[i]] for i in ids] == list(teacher)
    shadow = requests.get(f"{server.url}/health", timeout=10).json()["shadow"]
    assert shadow["last_error"] is None and shadow["off"] is None, shadow


def test_a_table_teacher_on_other_columns_gets_the_rows_decoded_and_an_object_teacher_is_off(churn, tmp_path, caplog):
    import dataclasses

    import mlflow

    from kd_ops.data.tables import TableSchema
    from kd_ops.models.loading import load_model
    from kd_ops.prediction_log.client import PredictionLog
    from kd_ops.serving.shadow import ShadowScorer, teacher_probability_fn

    mlflow.set_tracking_uri(churn["uri"])
    teacher = load_model(churn["teacher_uri"])
    schema: TableSchema = churn["schema"]
    x = schema.encode(churn["frame"].iloc[:20])
    direct = teacher.encoded_proba(x)
    np.testing.assert_allclose(teacher_probability_fn(teacher, schema)(x), direct, rtol=1e-5)
    # A student on the same data with its columns in another order: the encoded rows mean other
    # things to the teacher, so it reads them decoded to the student's columns and types.
    reordered = dataclasses.replace(schema, columns=schema.columns[::-1], _index={})
    np.testing.assert_allclose(teacher_probability_fn(teacher, reordered)(x[:, ::-1]), direct, rtol=1e-5)

    plog = PredictionLog.open_sync(f"sqlite:///{tmp_path}/p.db")
    scorer = ShadowScorer(1.0, plog)
    try:
        with caplog.at_level(logging.WARNING, logger="kd_ops.serving.shadow"):
            for _ in range(3):
                scorer.offer("object:my_pkg.MyTeacher", ["p0"], x[:1], schema)
        stats = scorer.stats()
        assert stats["offered"] == 0 and "Python object" in stats["off"] and "--teacher" in stats["off"]
        assert len([r for r in caplog.records if "Python object" in r.getMessage()]) == 1
    finally:
        scorer.close()
        plog.close()


def test_the_openapi_of_a_table_model_is_what_the_server_takes(server):
    """Fuzzed from the served document (as test_serve_fuzz does for a model of rows): no 5xx, every
    status documented, and a body the document forbids is refused."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.feedback import NO_FEEDBACK
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    def statuses_of(path: str, mode: GenerationMode) -> dict[int, int]:
        run = [*checks, negative_data_rejection] if mode == GenerationMode.NEGATIVE else checks
        statuses: dict[int, int] = {}

        @given(case=api[path]["POST"].as_strategy(mode, feedback=NO_FEEDBACK))
        @settings(
            max_examples=25,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )
        def fuzz(case) -> None:
            response = case.call_and_validate(base_url=server.url, headers=AUTH, checks=run, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        fuzz()
        return statuses

    for path in ("/predict", "/invocations", "/feedback"):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            statuses = statuses_of(path, mode)
            if path != "/feedback" and mode == GenerationMode.POSITIVE:
                assert 200 in statuses, (path, statuses)
