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

from kd_ops.prediction_log.reader import read_predictions

from ..conftest import tiny_raw
from ..servers import ServerProcess, free_port

pytestmark = pytest.mark.slow

NAME = "serve-student"
TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two distilled versions of one model: v1 the champion, v2 registered but not promoted."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

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
    from kd_ops.registry.promotion import promote, rollback

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
        ([NAME, "--host", "0.0.0.0"], "--host 0.0.0.0: listening on every interface needs"),
        ([NAME, "--host", "::"], "--allowed-host NAME"),
        ([NAME, "--allowed-host", "api.example:8080"], "--allowed-host 'api.example:8080'"),
    ],
)
def test_serve_refuses_bad_settings_before_opening_the_port(registry, tmp_path, capsys, monkeypatch, args, message):
    from kd_ops.cli.main import main

    monkeypatch.setenv("KD_OPS_TOKEN", TOKEN)
    code = main(
        ["serve", *args, "--tracking-uri", registry["uri"], "--port", str(free_port())]
        + ([] if "--store" in args else ["--store", f"sqlite:///{tmp_path}/p.db"])
    )
    assert code == 2
    assert message in capsys.readouterr().err


# -- issue 14: drive-by requests, DNS rebinding, feedback echo and replays, /health, /invocations ----
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_browser_drive_bys_and_rebinding_hosts_are_refused_and_nothing_is_logged(registry, tmp_path):
    served = start_server(registry, tmp_path)
    try:
        row = registry["x"][0].tolist()
        body = json.dumps({"rows": [row]})
        port = served.url.rsplit(":", 1)[1]
        assert served.predict([row]).status_code == 200
        before = served.count()
        # What a web page can send cross-origin without a CORS preflight: text/plain, forms (and no type).
        page = {"Origin": "http://evil.example"}
        drive_bys = [
            ("/predict", {"data": body, "headers": {**page, "Content-Type": "text/plain"}}),
            ("/predict", {"data": body, "headers": {**page, "Content-Type": "text/plain;charset=UTF-8"}}),
            ("/predict", {"data": {"rows": "1"}, "headers": page}),  # application/x-www-form-urlencoded
            ("/predict", {"files": {"rows": ("r.json", body)}, "headers": page}),  # multipart/form-data
            ("/predict", {"data": body, "headers": {**page, "Content-Type": ""}}),
            ("/predict", {"data": body, "headers": {"Content-Type": "application/json; charset=latin-1"}}),
            ("/invocations", {"data": json.dumps({"inputs": [row]}), "headers": {**page, "Content-Type": "text/csv"}}),
            ("/feedback", {"data": "{}", "headers": {**page, **AUTH, "Content-Type": "text/plain"}}),
        ]
        for path, kw in drive_bys:
            r = requests.post(f"{served.url}{path}", timeout=30, **kw)
            assert r.status_code == 415, (path, kw, r.text)
            assert r.json()["field"] == "Content-Type" and "Content-Type" in r.json()["detail"]
            assert r.json()["errors"] == [{"field": "Content-Type", "message": r.json()["detail"]}]
        ok = requests.post(
            f"{served.url}/predict", data=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=30
        )
        assert ok.status_code == 200, ok.text

        # DNS rebinding: the page's own name, now resolving to 127.0.0.1, arrives in the Host header.
        evil = {"Host": f"evil.example:{port}"}
        for method, path, kw in [
            ("post", "/predict", {"json": {"rows": [row]}}),
            ("post", "/invocations", {"json": {"inputs": [row]}}),
            ("post", "/feedback", {"json": {"labels": [{"prediction_id": "a", "label": 1}]}, "headers": AUTH}),
            ("get", "/health", {}),
            ("get", "/model", {}),
            ("get", "/openapi.json", {}),
        ]:
            headers = {**kw.pop("headers", {}), **evil}
            r = requests.request(method, f"{served.url}{path}", headers=headers, timeout=30, **kw)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["field"] == "Host" and "evil.example" in r.json()["detail"]
        for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", "LOCALHOST.:1"):  # loopback names, any port
            assert requests.get(f"{served.url}/health", headers={"Host": host}, timeout=10).status_code == 200, host
        assert served.count() == before + 1  # only the one application/json request was logged
    finally:
        served.proc.stop()

    allowed = start_server(registry, tmp_path, "--allowed-host", "evil.example", store=served.store)
    try:
        port = allowed.url.rsplit(":", 1)[1]
        r = requests.post(
            f"{allowed.url}/predict", json={"rows": [row]}, headers={"Host": f"evil.example:{port}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        other = requests.get(f"{allowed.url}/health", headers={"Host": f"other.example:{port}"}, timeout=10)
        assert other.status_code == 400
        frame = read_predictions(allowed.store)
        assert len(frame) == before + 2 and frame["id"].iloc[-1] == r.json()["predictions"][0]["id"]
    finally:
        allowed.proc.stop()


def test_host_policy_names():
    from kd_ops.core.errors import ConfigError
    from kd_ops.serving.hosts import LOOPBACK_NAMES, host_policy

    assert host_policy("127.0.0.1") == LOOPBACK_NAMES
    assert host_policy("::1", ["api.example"]) == LOOPBACK_NAMES | {"api.example"}
    assert host_policy("10.1.2.3") == {"10.1.2.3"}  # not loopback: only its own address
    assert host_policy("0.0.0.0", ["API.example.", "[::1]"]) == {"api.example", "::1"}
    assert host_policy("::", ["*"]) is None
    for bound, allowed in [("0.0.0.0", []), ("::", []), ("127.0.0.1", ["api.example:8080"]), ("::1", ["http://a"])]:
        with pytest.raises(ConfigError):
            host_policy(bound, allowed)


def test_feedback_echo_is_capped_and_a_replayed_request_id_stores_once(server, registry):
    r = server.predict(registry["x"][:3])
    assert r.status_code == 200
    ids = [p["id"] for p in r.json()["predictions"]]
    post = lambda body: requests.post(f"{server.url}/feedback", json=body, headers=AUTH, timeout=60)  # noqa: E731

    unknown = [{"prediction_id": f"{i:032x}", "label": 1} for i in range(5000)]
    r = post({"labels": [{"prediction_id": ids[0], "label": 1}, *unknown]})
    assert r.status_code == 422
    assert len(r.content) < 4000, len(r.content)  # not an echo of 5,000 ids
    body = r.json()
    assert body["unknown_ids"] == 5000 and "5000 unknown prediction ids" in body["detail"]
    assert body["field"] == "labels[1].prediction_id" and len(body["errors"]) == 20
    assert body["errors"][19] == {"field": "labels[20].prediction_id", "message": "unknown prediction id"}

    labels = [{"prediction_id": pid, "label": k} for k, pid in enumerate(ids)]
    first = post({"labels": labels, "request_id": "retry-me-1"})
    assert first.status_code == 200 and first.json() == {"stored": 3}
    again = post({"labels": labels, "request_id": "retry-me-1"})
    assert again.status_code == 200 and again.json() == {"stored": 3, "replayed": True}
    # A correction sent meanwhile stays the latest label: the replay did not make the old one latest again.
    assert post({"labels": [{"prediction_id": ids[0], "label": 7}]}).json() == {"stored": 1}
    assert post({"labels": labels, "request_id": "retry-me-1"}).json() == {"stored": 3, "replayed": True}
    other = post({"labels": labels[:1], "request_id": "retry-me-1"})
    assert other.status_code == 409 and other.json()["field"] == "request_id"
    assert post({"labels": labels, "request_id": "has space"}).status_code == 422

    # Racing copies of one request: the request table's primary key lets one commit; the others replay.
    race = [{"prediction_id": ids[1], "label": 9}]
    answers: list[requests.Response] = []
    barrier = threading.Barrier(6)

    def send() -> None:
        barrier.wait()
        answers.append(post({"labels": race, "request_id": "raced"}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(a.status_code for a in answers) == [200] * 6, [a.text for a in answers]
    assert sorted(a.json().get("replayed", False) for a in answers) == [False] + [True] * 5

    frame = read_predictions(server.store)
    assert frame.set_index("id").loc[ids, "label"].tolist() == [7, 9, 2]
    import sqlalchemy as sa

    engine = sa.create_engine(server.store)
    try:
        with engine.connect() as conn:
            n_labels = conn.execute(sa.text("SELECT count(*) FROM kd_ops_feedback")).scalar_one()
            requests_ = conn.execute(sa.text("SELECT request_id, stored FROM kd_ops_feedback_requests")).all()
    finally:
        engine.dispose()
    assert n_labels == 3 + 1 + 1  # the first request, the correction, one raced copy
    assert sorted(map(tuple, requests_)) == [("raced", 1), ("retry-me-1", 3)]
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok", health  # a refused racing copy is not a failing store


def test_health_is_degraded_while_commits_fail_and_ok_after(registry, tmp_path):
    served = start_server(registry, tmp_path)
    path = served.store.removeprefix("sqlite:///")
    try:
        x = registry["x"][:2]
        assert served.predict(x).status_code == 200
        before = served.count()
        with sqlite3.connect(path) as conn:  # the store itself refuses every new prediction
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON kd_ops_predictions"
                " BEGIN SELECT RAISE(ABORT, 'kd-ops test: this store refuses writes'); END"
            )
        for n in (1, 2):
            r = served.predict(x)
            assert r.status_code == 503 and "not served" in r.json()["detail"], r.text
            h = requests.get(f"{served.url}/health", timeout=10)
            assert h.status_code == 200 and h.json()["status"] == "degraded", h.text
            assert h.json()["log"]["consecutive_failed_commits"] == n
            assert "this store refuses writes" in h.json()["log"]["last_commit_error"]
        with sqlite3.connect(path) as conn:
            conn.execute("DROP TRIGGER refuse")
        assert served.predict(x).status_code == 200
        h = requests.get(f"{served.url}/health", timeout=10).json()
        assert h["status"] == "ok" and h["log"]["consecutive_failed_commits"] == 0, h
        assert h["log"]["last_commit_error"] is None and h["log"]["failed_commits"] == 2
        assert served.count() == before + 2
    finally:
        served.proc.stop()


def test_invocations_speaks_mlflows_scoring_protocol_and_logs_like_predict(server, registry):
    x = registry["x"][:5]
    rows = x.tolist()
    answered = server.predict(x).json()["predictions"]
    expected = np.array([p["probabilities"] for p in answered])
    before = server.count()
    columns = [f"f{i}" for i in range(x.shape[1])]
    bodies = [
        {"inputs": rows},
        {"instances": rows},
        {"dataframe_split": {"columns": columns, "data": rows}},
        {"dataframe_split": {"columns": list(range(x.shape[1])), "data": rows, "index": [0, 1, 2, 3, 4]}},
        {"dataframe_records": [dict(zip(columns, row)) for row in rows]},
    ]
    ids = []
    for body in bodies:
        r = requests.post(f"{server.url}/invocations", json=body, timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]  # per row: class, probabilities, prediction id (as /predict answers)
        np.testing.assert_allclose(np.array([p["probabilities"] for p in preds]), expected, rtol=1e-6)
        assert [p["class"] for p in preds] == [p["class"] for p in answered]
        assert r.json()["prediction_ids"] == [p["prediction_id"] for p in preds] and len(preds) == 5
        ids += r.json()["prediction_ids"]
    n = len(bodies)
    frame = read_predictions(server.store, ids=ids)
    assert sorted(frame["id"]) == sorted(ids) and server.count() == before + 5 * n
    np.testing.assert_allclose(np.stack(frame["probabilities"]), np.tile(expected, (n, 1)), rtol=1e-5)
    np.testing.assert_allclose(np.stack(frame["inputs"]), np.tile(x, (n, 1)), rtol=1e-6)
    assert set(frame["slice_ink"]) <= {"low", "mid", "high"}  # the server's own slices, as /predict logs them

    row = rows[0]
    bad = [
        ({"inputs": [row[:-1]]}, "inputs[0]"),
        ({"instances": [row[:3] + ["x"] + row[4:]]}, "instances[0][3]"),
        ({"dataframe_split": {"columns": columns[:-1], "data": [row]}}, "dataframe_split.columns"),
        ({"dataframe_split": {"columns": columns, "data": [row[:-1]]}}, "dataframe_split.data[0]"),
        ({"dataframe_split": {"columns": ["a"] * len(row), "data": [row]}}, "dataframe_split.columns"),
        ({"inputs": [row], "instances": [row]}, "body"),
        ({}, "body"),
        ({"inputs": [row], "params": {}}, "params"),
        ({"inputs": None, "instances": [row]}, "body"),
        ({"dataframe_records": [dict(zip(columns[:-1], row))]}, "dataframe_records[0]"),
        ({"dataframe_records": [dict(zip(columns, row)), {"a": 1}]}, "dataframe_records[1]"),
        ({"dataframe_records": [{**dict(zip(columns, row)), "f3": "x"}]}, "dataframe_records[0].f3"),
        ({"records": [dict(zip(columns, row))]}, "records"),
    ]
    for body, field in bad:
        r = requests.post(f"{server.url}/invocations", json=body, timeout=30)
        assert r.status_code == 422 and r.json()["field"] == field, (field, r.text)
    r = requests.post(f"{server.url}/predict", json={"records": [dict(zip(columns, row))]}, timeout=30)  # rows only
    assert r.status_code == 422 and r.json()["field"] == "records" and "not records" in r.json()["detail"], r.text
    assert server.count() == before + 5 * n


def test_add_feedback_from_a_thread_takes_a_request_id_too(tmp_path):
    from kd_ops.prediction_log.client import PredictionLog
    from kd_ops.prediction_log.feedback import ReusedRequestId
    from kd_ops.prediction_log.protocol import prediction_batch
    from kd_ops.prediction_log.store import UnknownPredictions, feedback, predictions

    plog = PredictionLog.open_sync(f"sqlite:///{tmp_path}/p.db")
    try:
        x = np.zeros((2, 3), dtype=np.float32)
        plog.write(predictions, prediction_batch("m", "1", x, np.full((2, 2), 0.5, np.float32), [{}, {}], ["p0", "p1"]))
        labels = [("p0", 1), ("p1", 0)]
        assert plog.add_feedback(labels, request_id="r-1") == 2
        assert plog.add_feedback(labels, request_id="r-1") == 2  # a replay: nothing new
        with pytest.raises(ReusedRequestId):
            plog.add_feedback([("p0", 0)], request_id="r-1")
        with pytest.raises(UnknownPredictions, match="1 unknown prediction id: "):
            plog.add_feedback([("nope\x00", 1)], request_id="r-2")
        assert plog.add_feedback(labels) == 2 and plog.add_feedback(labels) == 2  # without an id, every call stores
        assert plog.count(feedback) == 6
        assert plog.failing_commits == 0 and plog.last_commit_error is None
    finally:
        plog.close()
