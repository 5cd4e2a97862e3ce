"""A distillation against a real `mlflow server` on 127.0.0.1, read back through its REST API:
what the MLflow UI shows is what this API returns."""

from __future__ import annotations

import pytest
import requests

from kd_ops.config.loading import config_from_dict
from kd_ops.evaluation.metrics import COMMON_METRICS
from kd_ops.pipeline.distillation import run_distillation

from ..conftest import tiny_raw
from ..servers import mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (url, _):
        yield url


def _api(url: str, path: str, **body):
    r = requests.post(f"{url}/api/2.0/mlflow/{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_runs_are_grouped_under_the_parent_and_share_metric_keys(server):
    cfg = config_from_dict(tiny_raw(server, registry={"name": "server-student"}), "server")
    result = run_distillation(cfg)

    parent = requests.get(f"{server}/api/2.0/mlflow/runs/get", params={"run_id": result.runs["parent"]}, timeout=30)
    parent_tags = {t["key"]: t["value"] for t in parent.json()["run"]["data"]["tags"]}
    assert parent_tags["kd_ops.role"] == "parent"

    children = _api(
        server,
        "runs/search",
        experiment_ids=[result.experiment_id],
        filter=f"tags.mlflow.parentRunId = '{result.runs['parent']}'",
    )["runs"]
    names = {run["info"]["run_name"]: run for run in children}
    assert set(names) == {"teacher", "baseline", "student"}
    keys = {}
    for name, run in names.items():
        assert run["info"]["status"] == "FINISHED"
        keys[name] = {m["key"] for m in run["data"]["metrics"]}
    evaluated = {name: {k for k in ks if k.startswith("test_") or k in COMMON_METRICS} for name, ks in keys.items()}
    assert evaluated["teacher"] == evaluated["baseline"] == evaluated["student"]
    assert set(COMMON_METRICS) <= evaluated["student"]

    # the registry through the same API: challenger and (no gates configured) champion
    alias = requests.get(
        f"{server}/api/2.0/mlflow/registered-models/alias",
        params={"name": "server-student", "alias": "champion"},
        timeout=30,
    ).json()["model_version"]
    assert alias["version"] == result.registered["version"]
    tags = {t["key"]: t["value"] for t in alias["tags"]}
    assert tags["kd_ops.gates"] == "passed"
    assert alias["description"].startswith("# server-student v")  # the model card

    # figures went through the server's artifact proxy
    listed = requests.get(
        f"{server}/api/2.0/mlflow/artifacts/list", params={"run_id": result.runs["parent"], "path": "plots"}, timeout=30
    ).json()
    assert {f["path"] for f in listed["files"]} >= {"plots/reliability.png", "plots/accuracy_vs_latency.png"}
