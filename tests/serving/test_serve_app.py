"""The app's wiring, in process and without a model: the routes live once on `router`, and each app
`create_app` builds answers from its own `ServerState` (`app.state.kd_ops`), with an OpenAPI that
carries its own served version's row width and class count. The HTTP behaviour itself is
tested against real server processes (test_serve.py, test_serve_fuzz.py)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

with warnings.catch_warnings():  # starlette's notice that its TestClient will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from kd_ops.serving.app import create_app, router
from kd_ops.serving.state import ServeSettings


def stand_in(version: str, n_features: int, n_classes: int) -> SimpleNamespace:
    """Enough of a `ServerState` for /model, /feedback's refusals and the OpenAPI (no log, no model)."""
    current = SimpleNamespace(
        name="m",
        version=version,
        alias="champion",
        n_features=n_features,
        n_classes=n_classes,
        describe=lambda: {"name": "m", "version": version},
    )
    return SimpleNamespace(settings=ServeSettings(name="m", token="secret"), current=current, log=None)


def test_each_app_answers_from_its_own_state():
    a = TestClient(create_app(stand_in("1", 4, 2), None))
    b = TestClient(create_app(stand_in("2", 9, 5), None))
    assert a.get("/model").json() == {"name": "m", "version": "1"}
    assert b.get("/model").json() == {"name": "m", "version": "2"}
    for client, width, top in ((a, 4, 1), (b, 9, 4)):
        paths = client.get("/openapi.json").json()["paths"]
        row = paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["rows"]
        assert (row["items"]["minItems"], row["items"]["maxItems"]) == (width, width)
        label = paths["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert label["properties"]["labels"]["items"]["properties"]["label"]["maximum"] == top
    assert {r.path for r in router.routes} == {"/predict", "/invocations", "/feedback", "/health", "/model"}


def test_request_errors_go_through_the_apps_handler():
    client = TestClient(create_app(stand_in("1", 4, 2), None))
    r = client.post("/feedback", json={"labels": [{"prediction_id": "x", "label": 0}]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/feedback", json={"labels": []}, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 422, r.text
    r = client.post(
        "/feedback", json={"labels": [{"prediction_id": "x", "label": 0}]}, headers={"Authorization": "Bearer secret"}
    )
    assert r.status_code == 409 and "--no-log" in r.json()["detail"]
    r = client.post("/predict", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = TestClient(create_app(stand_in("1", 4, 2))).get("/model")  # default: loopback names only
    assert r.status_code == 400
