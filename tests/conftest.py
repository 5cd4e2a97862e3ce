"""Shared fixtures: a real MLflow on a temporary SQLite database, and one small distillation.

Tests run offline and without telemetry; PREFECT_HOME points into the session's temp dir.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="kd-ops-tests-")
os.environ.setdefault("PREFECT_HOME", str(Path(_HOME) / "prefect"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME}/default.db")

from kd_ops.core.env import apply_offline_defaults  # noqa: E402

from .postgres import postgres, store_url  # noqa: E402, F401  (PostgreSQL fixtures)
from .tables_fixtures import churn_champion  # noqa: E402, F401  (one churn table model per session)

apply_offline_defaults()

ROOT = Path(__file__).resolve().parent.parent


def tiny_raw(tracking_uri: str, **sections) -> dict:
    """A config small enough to train in seconds, as a dict (override sections by keyword)."""
    raw = {
        "seed": 0,
        "data": {"name": "digits", "batch_size": 128},
        "teacher": {"model": "cnn", "params": {"channels": [8, 16], "hidden": 32}, "epochs": 3},
        "student": {"model": "mlp", "params": {"hidden": [16]}, "epochs": 4},
        "distill": {"method": "kd", "temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1},
        "train": {"progress_bar": False},
        "evaluation": {"latency_repeats": 10, "throughput_repeats": 2},
        "tracking": {"uri": tracking_uri, "experiment": "tests"},
        "registry": {"name": "test-student"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def churn_raw(tracking_uri: str, root, name: str, experiment: str, **sections) -> dict:
    """A small churn table config (LightGBM teacher, MLP student, 1,500 rows) as a dict."""
    raw = {
        "data": {"name": "churn", "rows": 1500},
        "student": {"epochs": 2},
        "tracking": {"uri": tracking_uri, "experiment": experiment},
        "registry": {"name": name},
        "evaluation": {"latency_repeats": 5, "throughput_repeats": 2, "throughput_batches": [1, 32]},
        "train": {"progress_bar": False},
        "distill": {"cache": {"dir": str(root / "cache")}},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def client_records(frame) -> list[dict]:
    """A table's rows as a client sends them: JSON values, null for a missing one."""
    import pandas as pd

    return [
        {k: None if pd.isna(v) else (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]


def table_log_rows(name: str, version: str, frame, probs, slices: list[dict] | None = None) -> list[dict]:
    """The log rows the server writes for a table model's answers to `frame` (its raw records,
    one request), through the server's own `prediction_batch` and `prediction_rows`."""
    import numpy as np

    from kd_ops.prediction_log.protocol import prediction_batch, prediction_rows

    records = client_records(frame)
    cut = slices if slices is not None else [{} for _ in records]
    x = np.zeros((len(records), 0), dtype=np.float32)  # not logged: the records are
    return prediction_rows(prediction_batch(name, version, x, np.asarray(probs), cut, records=records))


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="session")
def distilled(tracking_uri):
    """One real distillation (teacher, baseline, student) shared by the read-only tests."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

    cfg = config_from_dict(tiny_raw(tracking_uri), "tiny")
    return cfg, run_distillation(cfg)


def pytest_addoption(parser):
    parser.addoption(
        "--screenshots",
        default=None,
        help="folder for the browser test's screenshots (tests/test_ui.py; `make screenshots` uses docs/img)",
    )
