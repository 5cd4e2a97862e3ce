"""`--tracking-uri` reaches every MLflow call a command makes, and a tracking URI that cannot work is
one line (exit 2), never a traceback.

The commands run as real processes with `MLFLOW_TRACKING_URI` removed from their environment and a
working directory of their own, so nothing but the flag can point them at the store: a model
download that fell back to MLflow's default would create `./mlflow.db` there and fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from kd_ops.cli.main import main

from ..conftest import tiny_raw
from ..servers import ServerProcess, free_port


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "KD_OPS_TOKEN": "t0ken", "OMP_NUM_THREADS": "1"}


def _kd_ops(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd_ops", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def own_store(tmp_path_factory):
    """A distilled student in a store of this module's own: these tests promote and roll back, and
    must neither see nor change the versions other tests register in the session's store."""
    from kd_ops import config_from_dict, run_distillation

    uri = f"sqlite:///{tmp_path_factory.mktemp('flag-store')}/mlflow.db"
    result = run_distillation(config_from_dict(tiny_raw(uri, registry={"name": "flag-student"}), "flag-store"))
    assert result.registered["promoted"]
    return uri, result


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """An empty working directory; after the test it must still hold no MLflow database."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    yield cwd
    assert not (cwd / "mlflow.db").exists(), "a command fell back to MLflow's default store in its working directory"
    assert not (cwd / "mlruns").exists()


def _config(tmp_path: Path, **sections) -> Path:
    # tracking.uri here is a store nobody may touch: only --tracking-uri points at the real one.
    raw = tiny_raw(f"sqlite:///{tmp_path}/not-this-one.db", **sections)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _teacher_uri(tracking_uri: str, name: str, version: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_model_version(name, version).tags["kd_ops.teacher_model_uri"]


@pytest.mark.slow
def test_serve_downloads_the_model_from_the_flag_s_store(own_store, tmp_path, elsewhere):
    tracking_uri, result = own_store
    port = free_port()
    cmd = [sys.executable, "-m", "kd_ops", "serve", result.registered["name"], "--port", str(port)]
    cmd += ["--tracking-uri", tracking_uri, "--store", f"sqlite:///{tmp_path}/predictions.db"]
    env = {"KD_OPS_TOKEN": "t0ken", "MLFLOW_TRACKING_URI": None}  # None: removed from the child's environment
    proc = ServerProcess(cmd, tmp_path / "serve.log", env=env, cwd=str(elsewhere))
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", lambda r: r.status_code == 200)
        row = result.datamodule.arrays("test")[0][:1]
        answer = requests.post(f"{url}/predict", json={"rows": np.asarray(row).tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == result.registered["version"]
    finally:
        proc.stop()


@pytest.mark.slow
def test_distill_loads_a_teacher_uri_from_the_flag_s_store(own_store, tmp_path, elsewhere):
    tracking_uri, result = own_store
    teacher = _teacher_uri(tracking_uri, result.registered["name"], result.registered["version"])
    config = _config(tmp_path, registry={"name": "elsewhere-student"}, student={"epochs": 1})
    out = _kd_ops(
        elsewhere,
        "distill",
        str(config),
        "--tracking-uri",
        tracking_uri,
        "--set",
        f"teacher.uri={teacher}",
        "--set",
        "tracking.experiment=elsewhere",
        "--set",
        "distill.baseline=false",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reg = json.loads(out.stdout)["registered"]
    assert reg["name"] == "elsewhere-student"
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(tracking_uri).get_model_version("elsewhere-student", reg["version"])
    assert mv.tags["kd_ops.teacher_model_uri"] == teacher  # the loaded teacher, not a new one
    assert not (tmp_path / "not-this-one.db").exists()


@pytest.mark.slow
def test_evaluate_promote_rollback_and_monitor_use_the_flag_s_store(own_store, tmp_path, elsewhere):
    tracking_uri, result = own_store
    name, version = result.registered["name"], result.registered["version"]
    config = _config(tmp_path)
    out = _kd_ops(elsewhere, "evaluate", f"models:/{name}@champion", "--config", str(config), "--tracking-uri", tracking_uri, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0.2 < json.loads(out.stdout)["model"]["test_accuracy"] <= 1  # tiny student, 10 classes

    out = _kd_ops(elsewhere, "promote", name, version, "--tracking-uri", tracking_uri, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["champion"] == version  # already the champion: nothing changes

    # No earlier champion: the refusal comes from the registry the flag named (it found the model).
    out = _kd_ops(elsewhere, "rollback", name, "--tracking-uri", tracking_uri)
    assert out.returncode == 2 and "nothing to roll back to" in out.stderr, out.stderr[-3000:]

    # The monitor resolves the champion and downloads its reference from the flag's store; only then
    # does it find that the prediction log is missing.
    out = _kd_ops(
        elsewhere, "monitor", str(config), "--tracking-uri", tracking_uri, "--store", f"sqlite:///{tmp_path}/none.db",
        "--set", f"registry.name={name}", "--no-record",
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "no prediction log" in out.stderr and "alias" not in out.stderr
    assert not (tmp_path / "not-this-one.db").exists()


def _bad_uris(tmp_path: Path) -> list[tuple[str, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    return [
        ("foo://x", "not a URI scheme MLflow can track to"),
        (str(tmp_path / "mlruns"), "a plain file store"),
        (f"file://{tmp_path}/mlruns", "a plain file store"),
        (f"sqlite:///{a_file}/mlflow.db", "cannot create or open it"),
    ]


@pytest.mark.parametrize("command", ["distill", "promote"])
def test_a_tracking_uri_that_cannot_work_is_one_line(command, tmp_path, capsys):
    config = _config(tmp_path)
    for uri, why in _bad_uris(tmp_path):
        args = [command, str(config)] if command == "distill" else [command, "some-model", "1"]
        assert main([*args, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert uri in err and why in err, err
    assert not (tmp_path / "not-this-one.db").exists()
