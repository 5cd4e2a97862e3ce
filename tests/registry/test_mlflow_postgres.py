"""The team tracking server of `mlflow/tracking-server.sh` on a real PostgreSQL: a distillation,
a promotion and a rollback against it, and the runs really in PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kd_ops.config.loading import config_from_dict
from kd_ops.pipeline.distillation import run_distillation

from ..conftest import ROOT, tiny_raw
from ..servers import ServerProcess, free_port

pytestmark = pytest.mark.slow
NAME = "team-student"


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("team-mlflow")
    db = postgres.database()
    port = free_port()
    env = {
        "KD_OPS_MLFLOW_DB": db,
        "KD_OPS_ARTIFACTS": str(root / "artifacts"),
        "KD_OPS_MLFLOW_PORT": str(port),
        "KD_OPS_MLFLOW_WORKERS": "1",
        "MLFLOW": str(Path(sys.executable).with_name("mlflow")),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    proc = ServerProcess(["bash", str(ROOT / "mlflow" / "tracking-server.sh")], root / "server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", lambda r: r.text.strip() == "OK")
        yield {"url": url, "db": db, "artifacts": root / "artifacts"}
    finally:
        proc.stop()


def test_distil_promote_and_roll_back_on_the_team_server(team_server):
    import mlflow
    import psycopg2
    from sqlalchemy.engine import make_url

    from kd_ops.registry.promotion import promote, rollback

    url = team_server["url"]
    first = run_distillation(config_from_dict(tiny_raw(url, registry={"name": NAME}), "team"))
    second = run_distillation(config_from_dict(tiny_raw(url, registry={"name": NAME, "promote": False}), "team"))
    assert first.registered["champion"] == first.registered["version"] == "1"
    assert second.registered["version"] == "2" and second.registered["champion"] == "1"

    promote(NAME, "2", force=True, uri=url)
    client = mlflow.MlflowClient(url)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    rollback(NAME, uri=url)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    # The model loads back through the server's artifact proxy, and everything is in PostgreSQL.
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.metadata.run_id == first.runs["student"]
    db = make_url(team_server["db"])
    with psycopg2.connect(host=db.host, port=db.port, user=db.username, dbname=db.database) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs")
            assert cur.fetchone()[0] >= 8  # two distillations: parent, teacher, baseline, student each
            cur.execute("SELECT count(*) FROM model_versions WHERE name = %s", (NAME,))
            assert cur.fetchone()[0] == 2
    assert any(team_server["artifacts"].rglob("MLmodel"))  # artifacts in the shared store, via the server
