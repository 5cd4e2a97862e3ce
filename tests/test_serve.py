"""`kd-ops serve` as a real process on 127.0.0.1, spoken to over real HTTP, with a real MLflow
registry (SQLite) and the prediction log read back from its SQLite file."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from kd_ops.prediction_log import read_predictions

from .conftest import tiny_raw
from .servers import ServerProcess, free_port

pytestmark = pytest.mark.slow

NAME = "serve-student"
TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two distilled versions of one model: v1 the champion, v2 registered but not promoted."""
    from kd_ops.config import config_from_dict
    from kd_ops.pipeline import run_distillation

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root}/mlflow.db"
    first = run_distillation(config_from_dict(tiny_raw(uri, registry={"name": NAME}), "serve-v1"))
    second = run_distillation(
        config_from_dict(tiny_raw(uri, seed=1, registry={"name": NAME, "promote": False}), "serve-v2")
    )
    x, y = first.datamodule.arrays("test")
    return {"uri": uri, "v1": first.registered["version"], "v2": second.registered["version"], "x": x, "y": y}


class Served:
    def __init__(self, proc: ServerProcess, url: str, store: str):
        self.proc, self.url, self.store = proc, url, store

    def predict(self, rows, **extra) -> requests.Response:
        return requests.post(f"{self.url}/predict", json={"rows": np.asarray(rows).tolist(), **extra}, timeout=30)

    def count(self) -> int:
        return len(read_predictions(self.store))


def start_server(registry, tmp_path: Path, *args: str, store: str | None = None) -> Served:
    port = free_port()
    store = store or f"sqlite:///{tmp_path}/predictions.db"
    cmd = [sys.executable, "-m", "kd_ops.cli", "serve", NAME, "--port", str(port), "--store", store]
    cmd += ["--tracking-uri", registry["uri"], *args]
    proc = ServerProcess(cmd, tmp_path / f"serve-{port}.log", env={"KD_OPS_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    proc.wait_healthy(f"{url}/health", lambda r: r.status_code == 200)
    return Served(proc, url, store)


@pytest.fixture
def server(registry, tmp_path, store_url):
    """A server logging to SQLite, then to PostgreSQL (`store_url`, tests/postgres.py)."""
    served = start_server(registry, tmp_path, "--poll-interval", "0.5", store=store_url)
    yield served
    served.proc.stop()


def test_predictions_and_feedback_land_in_the_store(server, registry):
    import mlflow

    x = registry["x"][:6]
    r = server.predict(x, slices={"site": "berlin"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": NAME, "version": registry["v1"], "alias": "champion"}
    preds = body["predictions"]
    assert len(preds) == 6 and len({p["id"] for p in preds}) == 6
    probs = np.array([p["probabilities"] for p in preds])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [p["class"] for p in preds] == probs.argmax(axis=1).tolist()
    assert {p["model_version"] for p in preds} == {registry["v1"]}

    # The same classes as the registered model gives through MLflow's own loader.
    mlflow.set_tracking_uri(registry["uri"])
    logits = mlflow.pyfunc.load_model(f"models:/{NAME}/{registry['v1']}").predict(x.astype(np.float32))
    assert [p["class"] for p in preds] == np.asarray(logits).argmax(axis=1).tolist()

    labels = [{"prediction_id": p["id"], "label": int(y)} for p, y in zip(preds[:4], registry["y"][:4])]
    assert requests.post(f"{server.url}/feedback", json={"labels": labels}, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert (
        requests.post(f"{server.url}/feedback", json={"labels": labels}, headers=wrong, timeout=30).status_code == 401
    )
    ok = requests.post(f"{server.url}/feedback", json={"labels": labels}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json() == {"stored": 4}

    frame = read_predictions(server.store, model_name=NAME)
    assert frame["id"].tolist() == [p["id"] for p in preds]  # oldest first, in row order
    assert (frame["model_version"] == registry["v1"]).all()
    assert frame["label"].iloc[:4].tolist() == registry["y"][:4].tolist() and frame["label"].iloc[4:].isna().all()
    assert (frame["slice_site"] == "berlin").all()
    assert set(frame["slice_ink"]) <= {"low", "mid", "high"}
    np.testing.assert_allclose(np.stack(frame["inputs"]), x, rtol=1e-6)
    np.testing.assert_allclose(np.stack(frame["probabilities"]), probs, rtol=1e-5)

    model = requests.get(f"{server.url}/model", timeout=10).json()
    client = mlflow.MlflowClient(registry["uri"])
    tags = client.get_model_version(NAME, registry["v1"]).tags
    assert model["version"] == registry["v1"] and model["n_features"] == x.shape[1] and model["n_classes"] == 10
    assert model["lineage"]["kd_ops.teacher_model_uri"] == tags["kd_ops.teacher_model_uri"]
    assert model["lineage"]["kd_ops.dataset_fingerprint"] == tags["kd_ops.dataset_fingerprint"]


def _chunked(data: bytes):
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


def test_every_bad_input_is_a_4xx_naming_the_field_and_the_log_is_untouched(server, registry):
    x = registry["x"]
    good = server.predict(x[:2])
    assert good.status_code == 200
    pid = good.json()["predictions"][0]["id"]
    before = server.count()
    row = x[0].tolist()
    post = lambda path, raw, **kw: requests.post(f"{server.url}{path}", data=raw, timeout=30, **kw)  # noqa: E731
    cases = [
        ({"rows": [row[:-1]]}, 422, "rows[0]"),
        ({"rows": [row, row + [1.0]]}, 422, "rows[1]"),
        ({"rows": [row[:5] + ["seven"] + row[6:]]}, 422, "rows[0][5]"),
        ({"rows": [row[:5] + ["7.0"] + row[6:]]}, 422, "rows[0][5]"),  # numbers as strings are refused too
        ({"rows": [row[:5] + [True] + row[6:]]}, 422, "rows[0][5]"),
        ('{"rows": [[' + ", ".join(["0"] * 3 + ["NaN"] + ["0"] * 60) + "]]}", 422, "rows[0][3]"),
        ('{"rows": [[' + ", ".join(["Infinity"] + ["0"] * 63) + "]]}", 422, "rows[0][0]"),
        ({"rows": [[1e39] * 64]}, 422, "rows[0][0]"),  # finite, but not as float32
        ({"rows": []}, 422, "rows"),
        ({}, 422, "rows"),
        ({"rows": [row], "extra": 1}, 422, "extra"),
        ({"rows": [row], "slices": [{"a": "1"}, {"a": "2"}]}, 422, "slices"),
        ({"rows": [row], "slices": {"ink": "low"}}, 422, "slices.ink"),
        ({"rows": [row], "slices": {"bad key": "x"}}, 422, "slices.bad key"),
        ({"rows": [row, row], "slices": [{"a": "1"}, 3]}, 422, "slices[1]"),
        ({"rows": "not rows", "extra": 1}, 422, "rows"),
        ("this is not json", 422, "body"),
    ]
    for body, status, field in cases:
        raw = body if isinstance(body, str) else json.dumps(body)
        r = post("/predict", raw, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (field, r.text)
        assert r.json()["field"] == field, (field, r.json())
        assert field in r.json()["detail"]

    huge = json.dumps({"rows": [row] * 20000}).encode()  # ~5 MB, over the 4 MiB default
    r = post("/predict", huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body" and "--max-body-bytes" in r.json()["detail"]
    r = post("/predict", _chunked(huge), headers={"Content-Type": "application/json"})  # no Content-Length
    assert r.status_code == 413 and r.json()["field"] == "body"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    feedback = [
        (
            {"labels": [{"prediction_id": pid, "label": 1}, {"prediction_id": "f" * 32, "label": 2}]},
            422,
            "labels[1].prediction_id",
        ),
        ({"labels": [{"prediction_id": pid, "label": 10}]}, 422, "labels[0].label"),
        ({"labels": [{"prediction_id": pid, "label": -1}]}, 422, "labels[0].label"),
        ({"labels": [{"prediction_id": pid, "label": "3"}]}, 422, "labels[0].label"),
        ({"labels": []}, 422, "labels"),
    ]
    for body, status, field in feedback:
        r = requests.post(f"{server.url}/feedback", json=body, headers=auth, timeout=30)
        assert r.status_code == status and r.json()["field"] == field, (field, r.text)

    assert server.count() == before  # nothing stored by any bad request, the known id got no label
    assert read_predictions(server.store)["label"].isna().all()
    assert server.predict(x[:3]).status_code == 200  # still serving
    assert server.count() == before + 3


def _client_loop(url: str, rows: list, stop: threading.Event, answered: list, failures: list) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            try:
                r = session.post(f"{url}/predict", json={"rows": rows}, timeout=30)
            except requests.RequestException as exc:
                failures.append(repr(exc))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            answered.append(r.json())


def test_hot_swap_fails_no_request_and_each_prediction_names_its_version(server, registry):
    from kd_ops.promotion import promote, rollback

    rows = registry["x"][:2].tolist()
    stop, answered, failures = threading.Event(), [], []
    clients = [
        threading.Thread(target=_client_loop, args=(server.url, rows, stop, answered, failures)) for _ in range(3)
    ]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        promote(NAME, registry["v2"], uri=registry["uri"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(a["model"]["version"] == registry["v2"] for a in answered[-20:]):
            time.sleep(0.2)
        time.sleep(1.0)  # keep sending after the swap
    finally:
        stop.set()
        for t in clients:
            t.join(60)
        rollback(NAME, uri=registry["uri"])  # v1 champion again for the other tests

    assert failures == []
    versions = [a["model"]["version"] for a in answered]
    assert set(versions) == {registry["v1"], registry["v2"]}
    # Once v2 answered a request that started after the swap, v1 never answers again (per client it is
    # monotone; across clients a v1 request in flight at the swap may finish after a v2 one).
    assert versions[-1] == registry["v2"]

    made_by = {p["id"]: p["model_version"] for a in answered for p in a["predictions"]}
    frame = read_predictions(server.store, model_name=NAME)
    assert len(frame) == len(made_by)  # every answered row logged once, nothing else
    assert dict(zip(frame["id"], frame["model_version"])) == made_by
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert {"from": registry["v1"], "to": registry["v2"]}.items() <= health["alias_watch"]["swaps"][0].items()


def test_sigkill_while_clients_send_loses_no_answered_prediction(registry, tmp_path, store_url):
    served = start_server(registry, tmp_path, store=store_url)
    rows = registry["x"][:64].tolist()  # batches big enough that a commit takes a few milliseconds
    stop, answered, failures = threading.Event(), [], []
    clients = [
        threading.Thread(target=_client_loop, args=(served.url, rows, stop, answered, failures)) for _ in range(4)
    ]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 60
    while len(answered) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    served.proc.kill(signal.SIGKILL)  # mid-stream: requests are in flight
    time.sleep(0.3)
    stop.set()
    for t in clients:
        t.join(60)
    assert len(answered) >= 100 and failures  # the clients saw the server go
    acked = {p["id"] for a in answered for p in a["predictions"]}

    restarted = start_server(registry, tmp_path, store=served.store)
    try:
        assert restarted.predict(registry["x"][:1]).status_code == 200
        stored = set(read_predictions(served.store)["id"])
        assert acked <= stored, f"{len(acked - stored)} answered predictions missing from the log"
        if served.store.startswith("sqlite:///"):
            with sqlite3.connect(served.store.removeprefix("sqlite:///")) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        restarted.proc.stop()


def test_shadow_teacher_scores_off_the_request_path_and_shutdown_keeps_its_work(registry, tmp_path):
    import mlflow

    served = start_server(registry, tmp_path, "--shadow-fraction", "1.0")
    try:
        x = registry["x"][:12]
        ids = []
        for i in range(0, 12, 3):
            r = served.predict(x[i : i + 3])
            assert r.status_code == 200
            ids += [p["id"] for p in r.json()["predictions"]]
        shadow = requests.get(f"{served.url}/health", timeout=10).json()["shadow"]
        assert shadow["offered"] == 4 and shadow["last_error"] is None, shadow
    finally:
        # SIGTERM at once, while the teacher may still be loading: a graceful shutdown scores
        # what was queued and commits it before the process ends.
        served.proc.stop()
    assert served.proc.proc.returncode in (0, -signal.SIGTERM), served.proc.output()[-2000:]
    frame = read_predictions(served.store)
    assert frame["id"].tolist() == ids
    teacher_uri = (
        mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, registry["v1"]).tags["kd_ops.teacher_model_uri"]
    )
    assert (frame["teacher_uri"] == teacher_uri).all()
    mlflow.set_tracking_uri(registry["uri"])
    teacher_logits = mlflow.pyfunc.load_model(teacher_uri).predict(x.astype(np.float32))
    assert frame["teacher_class"].tolist() == np.asarray(teacher_logits).argmax(axis=1).tolist()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-model"], "has no version with alias @champion"),
        ([NAME, "--alias", "staging"], "has no version with alias @staging"),
        ([NAME, "--store", "not a url"], "--store"),
        ([NAME, "--shadow-fraction", "1.5"], "--shadow-fraction"),
        ([NAME, "--no-log", "--shadow-fraction", "0.1"], "--shadow-fraction needs the prediction log"),
    ],
)
def test_serve_refuses_bad_settings_before_opening_the_port(registry, tmp_path, capsys, monkeypatch, args, message):
    from kd_ops.cli import main

    monkeypatch.setenv("KD_OPS_TOKEN", TOKEN)
    code = main(
        ["serve", *args, "--tracking-uri", registry["uri"], "--port", str(free_port())]
        + ([] if "--store" in args else ["--store", f"sqlite:///{tmp_path}/p.db"])
    )
    assert code == 2
    assert message in capsys.readouterr().err
