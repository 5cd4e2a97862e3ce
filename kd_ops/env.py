"""Process environment: offline and no telemetry unless the user has said otherwise."""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "EVIDENTLY_DISABLE_TELEMETRY": "1",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "GIT_PYTHON_REFRESH": "quiet",
    # MLflow 3.17 unpickles model files unless told not to; kd-ops' own loading (kd_ops.loading)
    # is pickle-free whatever this says, and this makes MLflow's own paths in a kd-ops process
    # (pyfunc loads, log_model's input-example check) refuse pickled code as well.
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
}


def apply_offline_defaults() -> None:
    """Set each variable only where the user has not: their environment wins."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
