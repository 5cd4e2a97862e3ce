"""`kd-ops serve`'s Prometheus metrics at /metrics: each series counted right on a real server
process over real HTTP (refusals too), the served version and alias swaps, the log's commit
histogram, shadow agreement against the log; nothing of a request, token or URL in the body;
`--no-metrics` turns it all off; the example dashboard and scrape config name real series.

The served model is the session's one distillation (`distilled`, tests/conftest.py) registered
again, twice, under a name of this module's own: no model is trained here."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kd_ops.prediction_log.reader import read_predictions
from kd_ops.serving import metrics as metrics_module

from ..conftest import ROOT
from ..servers import ServerProcess, free_port

pytestmark = pytest.mark.slow

NAME = "metrics-student"
TOKEN = "metrics-token-5f1e9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCUMENTED = re.findall(r"^    (kd_ops_\w+)", metrics_module.__doc__, re.M)


@pytest.fixture(scope="module")
def registry(distilled, tracking_uri):
    """The session's student registered twice under NAME (same files and lineage): v1 @champion."""
    import mlflow

    _, result = distilled
    client = mlflow.MlflowClient(tracking_uri)
    source = client.get_model_version(result.registered["name"], result.registered["version"])
    lineage = {k: v for k, v in source.tags.items() if k.startswith("kd_ops.")}
    client.create_registered_model(NAME)
    versions = [
        client.create_model_version(NAME, source.source, run_id=source.run_id, tags=lineage).version for _ in range(2)
    ]
    client.set_registered_model_alias(NAME, "champion", versions[0])
    x, y = result.datamodule.arrays("test")
    return {"uri": tracking_uri, "v1": str(versions[0]), "v2": str(versions[1]), "x": x, "y": y, "client": client}


def start(registry, tmp_path: Path, *args: str) -> tuple[ServerProcess, str, str]:
    port = free_port()
    store = f"sqlite:///{tmp_path}/predictions.db"
    cmd = [sys.executable, "-m", "kd_ops.cli", "serve", NAME, "--port", str(port), "--store", store]
    cmd += ["--tracking-uri", registry["uri"], *args]
    proc = ServerProcess(cmd, tmp_path / f"serve-{port}.log", env={"KD_OPS_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    proc.wait_healthy(f"{url}/health", lambda r: r.status_code == 200)
    return proc, url, store


def scrape(url: str) -> tuple[str, dict[str, list]]:
    """The /metrics body and its samples by sample name (`kd_ops_requests_total`, `..._bucket`)."""
    r = requests.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return r.text, samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when absent: a counter never incremented)."""
    found = [s.value for s in samples.get(name, []) if s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else 0.0


def test_metrics_count_requests_rows_commits_swaps_and_shadow_agreement(registry, tmp_path):
    proc, url, store = start(registry, tmp_path, "--shadow-fraction", "1.0", "--poll-interval", "0.5")
    try:
        x = registry["x"]
        secret_value, secret_slice = 13.371337, "berlin-7f3a"
        rows = x[:3].tolist()
        rows[0][0] = secret_value
        r = requests.post(f"{url}/predict", json={"rows": rows, "slices": {"site": secret_slice}}, timeout=30)
        assert r.status_code == 200, r.text
        ids = [p["id"] for p in r.json()["predictions"]]
        bad = [x[0].tolist(), x[1].tolist()[:-1]]  # the second row one value short
        assert requests.post(f"{url}/predict", json={"rows": bad}, timeout=30).status_code == 422
        plain = {"Content-Type": "text/plain"}
        assert requests.post(f"{url}/predict", data=json.dumps({"rows": rows}), headers=plain).status_code == 415
        rebinding = {"Host": "evil.example"}
        assert requests.post(f"{url}/predict", json={"rows": rows}, headers=rebinding, timeout=30).status_code == 400
        assert requests.get(f"{url}/metrics", headers=rebinding, timeout=30).status_code == 400  # same guard
        r = requests.post(f"{url}/invocations", json={"inputs": x[3:7].tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        ids += r.json()["prediction_ids"]
        labels = [{"prediction_id": pid, "label": int(y)} for pid, y in zip(ids[:2], registry["y"][:2])]
        assert requests.post(f"{url}/feedback", json={"labels": labels}, timeout=30).status_code == 401
        assert requests.post(f"{url}/feedback", json={"labels": labels}, headers=AUTH, timeout=30).status_code == 200
        assert requests.get(f"{url}/no/such/path/7f3a", timeout=30).status_code == 404
        deadline = time.monotonic() + 120  # the teacher loads on the first shadowed request
        while (shadow := requests.get(f"{url}/health", timeout=10).json()["shadow"])["scored_rows"] < 7:
            assert time.monotonic() < deadline and shadow["failed_rows"] == 0, shadow
            time.sleep(0.2)

        body, samples = scrape(url)
        requests_of = lambda endpoint, status: value(  # noqa: E731
            samples, "kd_ops_requests_total", endpoint=endpoint, status=str(status)
        )
        rows_of = lambda endpoint, status: value(samples, "kd_ops_rows_total", endpoint=endpoint, status=str(status))  # noqa: E731
        for endpoint, status, n_requests, n_rows in [
            ("/predict", 200, 1, 3),
            ("/predict", 422, 1, 2),  # the rows of a refused body count once it parsed
            ("/predict", 415, 1, 0),
            ("/predict", 400, 1, 0),  # refused for its Host: before routing, still under its route
            ("/invocations", 200, 1, 4),
            ("/feedback", 401, 1, 0),  # refused before its body is parsed
            ("/feedback", 200, 1, 2),
            ("/metrics", 400, 1, 0),
            ("other", 404, 1, 0),  # never the raw path: a client cannot grow the label set
        ]:
            assert requests_of(endpoint, status) == n_requests, (endpoint, status)
            assert rows_of(endpoint, status) == n_rows, (endpoint, status)
        assert value(samples, "kd_ops_request_seconds_count", endpoint="/predict") == 4
        assert value(samples, "kd_ops_request_seconds_count", endpoint="/invocations") == 1
        predict_seconds = [s for s in samples["kd_ops_request_seconds_bucket"] if s.labels["endpoint"] == "/predict"]
        latency = {s.labels["le"]: s.value for s in predict_seconds}
        assert latency["+Inf"] == 4 and 0 < value(samples, "kd_ops_request_seconds_sum", endpoint="/predict") < 30

        assert [s.labels for s in samples["kd_ops_served_model_info"]] == [
            {"name": NAME, "version": registry["v1"], "alias": "champion"}
        ]
        assert value(samples, "kd_ops_alias_swaps_total") == 0
        # Five writes: /predict, /invocations and /feedback, and the two shadowed requests' rows.
        assert value(samples, "kd_ops_prediction_log_commit_seconds_count") == 5
        assert 0 < value(samples, "kd_ops_prediction_log_commit_seconds_sum") < 30
        assert value(samples, "kd_ops_prediction_log_queue_depth") == 0
        assert value(samples, "kd_ops_prediction_log_failures_total") == 0
        assert value(samples, "kd_ops_prediction_log_commits_total") >= 1
        assert value(samples, "kd_ops_prediction_log_up") == 1
        frame = read_predictions(store)
        assert value(samples, "kd_ops_shadow_rows_total") == len(frame) == 7
        agreed = int((frame["predicted_class"] == frame["teacher_class"]).sum())
        assert value(samples, "kd_ops_shadow_agreements_total") == agreed

        # Every series the module documents, and no other kd_ops_ series (`_created`: the client's own).
        families = {f.name for f in text_string_to_metric_families(body)}
        exported = {n + "_total" if n + "_total" in samples else n for n in families if not n.endswith("_created")}
        assert exported == set(DOCUMENTED)
        serving_doc = (ROOT / "docs" / "serving.md").read_text()
        assert [n for n in DOCUMENTED if f"`{n}" not in serving_doc] == []

        # Nothing of a request, the token, or a URL.
        for secret in (TOKEN, str(secret_value), secret_slice, "7f3a", str(tmp_path), store, registry["uri"], "sqlite"):
            assert secret not in body, secret

        # An alias swap: the info series names the new version only, and the swap is counted.
        registry["client"].set_registered_model_alias(NAME, "champion", registry["v2"])
        deadline = time.monotonic() + 60
        while (info := [s.labels["version"] for s in scrape(url)[1]["kd_ops_served_model_info"]]) != [registry["v2"]]:
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        _, samples = scrape(url)
        assert value(samples, "kd_ops_alias_swaps_total") == 1
        assert len(samples["kd_ops_served_model_info"]) == 1
        after = requests.post(f"{url}/predict", json={"rows": x[:1].tolist()}, timeout=30).json()
        assert after["model"]["version"] == registry["v2"]
        _, samples = scrape(url)
        assert value(samples, "kd_ops_rows_total", endpoint="/predict", status="200") == 4
    finally:
        registry["client"].set_registered_model_alias(NAME, "champion", registry["v1"])
        proc.stop()


def test_no_metrics_flag_removes_the_route_and_the_instrumentation(registry, tmp_path):
    proc, url, _ = start(registry, tmp_path, "--no-metrics", "--no-log")
    try:
        assert requests.post(f"{url}/predict", json={"rows": registry["x"][:2].tolist()}, timeout=30).status_code == 200
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 404
        assert "/metrics" not in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    finally:
        proc.stop()


def test_the_example_dashboard_and_scrape_config_name_exported_series():
    """docs/grafana-dashboard.json and docs/prometheus.yml parse, and every series a dashboard
    query names is one the server exports (with the log and the shadow on)."""
    from kd_ops.serving.metrics import ServeMetrics

    state = SimpleNamespace(
        current=SimpleNamespace(name="m", version="1", alias="champion"),
        swaps=[],
        log=SimpleNamespace(pending=lambda: 0, commits=0, failures=0, rows_written=0, alive=True),
        shadow=SimpleNamespace(scored=0, agreed=0, dropped=0, failed=0, queued=lambda: 0),
    )
    metrics = ServeMetrics(state, ["/predict"])
    metrics.endpoint({"path": "/predict"}).record(200, 1, 0.001)  # a labelled series has samples once counted
    body, _ = metrics.render()
    exported = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    scrape_config = yaml.safe_load((ROOT / "docs" / "prometheus.yml").read_text())
    (job,) = [j for j in scrape_config["scrape_configs"] if j["metrics_path"] == "/metrics"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    named = {name for expr in exprs for name in re.findall(r"\bkd_ops_\w+", expr)}
    assert named and named <= exported, sorted(named - exported)
    assert {"kd_ops_shadow_agreements_total", "kd_ops_served_model_info", "kd_ops_request_seconds_bucket"} <= named


def test_the_endpoint_label_is_the_route_never_the_path():
    """In process: unknown paths share `other`, a refused Host keeps its route's label, and two
    apps in one process count separately (each has its own registry)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from kd_ops.serving.app import create_app
    from kd_ops.serving.state import ServeSettings

    def app():
        current = SimpleNamespace(
            name="m", version="1", alias="champion", n_features=4, n_classes=2, describe=lambda: {"name": "m"}
        )
        state = SimpleNamespace(settings=ServeSettings(name="m"), current=current, log=None, shadow=None, swaps=[])
        return TestClient(create_app(state))

    a, b = app(), app()
    for i in range(5):
        assert a.get(f"/x/{i}", headers={"Host": "127.0.0.1"}).status_code == 404
    assert a.get("/model", headers={"Host": "evil.example"}).status_code == 400
    assert a.get("/model", headers={"Host": "localhost"}).status_code == 200
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(a.get("/metrics", headers={"Host": "localhost"}).text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    counted = {(s.labels["endpoint"], s.labels["status"]): s.value for s in samples["kd_ops_requests_total"]}
    assert counted == {("other", "404"): 5, ("/model", "400"): 1, ("/model", "200"): 1}
    other = b.get("/metrics", headers={"Host": "localhost"}).text
    assert 'kd_ops_requests_total{endpoint="other"' not in other
    assert b.app.state.kd_ops_metrics.registry is not a.app.state.kd_ops_metrics.registry
