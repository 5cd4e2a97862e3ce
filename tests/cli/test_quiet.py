"""Library chatter (Lightning's device lines and tips, MLflow's database set-up lines) stays off the
terminal unless `-v` is given; `-v` brings it back, so the quiet run proves a filter, not an absence.

The commands run as real processes (`python -m kd_ops distill`) on a tiny config, in a directory of
their own, each with a fresh SQLite tracking store: MLflow says "Creating initial MLflow database
tables..." only for a new database.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_ops.core.env import QUIET_ENV, QUIET_LOGGERS, apply_quiet_defaults, quiet_requested

from ..conftest import tiny_raw

CHATTER = ("GPU available", "litmodels", "litlogger", "Creating initial MLflow database tables")


def _distill(tmp_path: Path, *flags: str) -> str:
    """stdout and stderr of `kd-ops [flags] distill` on a tiny config with a new tracking store."""
    cwd = tmp_path / "run"
    cwd.mkdir()
    raw = tiny_raw(f"sqlite:///{tmp_path}/mlflow.db", teacher={"epochs": 1}, student={"epochs": 1})
    config = cwd / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    # Nothing from this test process decides: not the quiet setting, nor MLflow's level.
    env = {k: v for k, v in os.environ.items() if k not in (QUIET_ENV, "MLFLOW_LOGGING_LEVEL", "MLFLOW_TRACKING_URI")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "kd_ops", *flags, "distill", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "registered test-student version 1" in done.stdout  # kd-ops' own messages stay
    return output


def test_distill_hides_library_chatter(tmp_path):
    output = _distill(tmp_path)
    shown = [text for text in CHATTER if text in output]
    assert not shown, f"{shown} reached the terminal:\n{output[-3000:]}"


def test_verbose_shows_it(tmp_path):
    output = _distill(tmp_path, "-v")
    assert "Creating initial MLflow database tables" in output or "GPU available" in output, output[-3000:]


@pytest.fixture
def clean_env(monkeypatch):
    """No quiet setting and no MLflow level in the environment; logger levels put back afterwards."""
    monkeypatch.delenv(QUIET_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    names = (*QUIET_LOGGERS, "mlflow")
    levels = {name: logging.getLogger(name).level for name in names}
    yield monkeypatch
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_reaches_child_processes_through_the_environment(clean_env):
    assert apply_quiet_defaults() is True
    assert os.environ[QUIET_ENV] == "1"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert logging.getLogger("lightning.pytorch.utilities.rank_zero").level == logging.WARNING


def test_user_environment_wins(clean_env):
    clean_env.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    assert apply_quiet_defaults() is True
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"

    clean_env.setenv(QUIET_ENV, "0")  # the same as -v, e.g. inherited from `kd-ops -v demo`
    assert quiet_requested() is False
    assert apply_quiet_defaults() is False


def test_verbose_is_passed_on(clean_env):
    clean_env.setenv(QUIET_ENV, "1")
    assert apply_quiet_defaults(verbose=True) is False
    assert os.environ[QUIET_ENV] == "0"  # so `kd-ops serve` and flow runs started from here say everything
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ
