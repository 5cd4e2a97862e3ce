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
    # MLflow 3.17 unpickles model files unless told not to; kd-ops' own loading (kd_ops.models.loading)
    # is pickle-free whatever this says, and this makes MLflow's own paths in a kd-ops process
    # (pyfunc loads, log_model's input-example check) refuse pickled code as well.
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
}


def apply_offline_defaults() -> None:
    """Set each variable only where the user has not: their environment wins."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


# --- Library chatter ------------------------------------------------------------------------------
# `KD_OPS_QUIET` carries the command line's choice to the processes kd-ops starts (`kd-ops serve`
# and `kd-ops deploy` in the demo, Prefect flow runs): unset or "1", libraries' start-up chatter is
# hidden; "0" (what `-v` sets), everything is shown.
QUIET_ENV = "KD_OPS_QUIET"

# Read by the libraries themselves when they are imported, so they reach child processes too.
# MLflow configures its own loggers (with a handler of its own) at import from MLFLOW_LOGGING_LEVEL
# (default INFO: "Creating initial MLflow database tables...", "Updating database tables"); with
# WARNING it also keeps alembic at WARNING.
QUIET_DEFAULTS = {"MLFLOW_LOGGING_LEVEL": "WARNING"}

# Loggers whose level the libraries never set, so setting it before their import holds. Lightning
# resets "lightning.pytorch" and "lightning.fabric" to INFO when imported, but its "GPU available /
# TPU available / HPU available" lines and its litmodels tip come through rank_zero_info, which logs
# to the rank_zero modules' own loggers.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "alembic",
)


def quiet_requested(verbose: bool = False) -> bool:
    """Whether library chatter is to be hidden: not with `-v`, nor where KD_OPS_QUIET is 0/false."""
    if verbose:
        return False
    return os.environ.get(QUIET_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def apply_quiet_defaults(verbose: bool = False) -> bool:
    """Hide library chatter in this process and the processes it starts, unless `verbose`; whether quiet.

    Without `verbose`, each variable is set only where the user has not (their environment wins,
    KD_OPS_QUIET=0 included); `verbose` (`-v`) sets KD_OPS_QUIET=0, so child processes say
    everything too. Call it before MLflow is imported: MLflow reads its level only then (if it is
    already imported, its logger is set here instead).
    """
    import logging
    import sys
    import warnings

    if verbose:
        os.environ[QUIET_ENV] = "0"
        return False
    os.environ.setdefault(QUIET_ENV, "1")
    if not quiet_requested():
        return False
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # torch/lightning internals, not the user's
    if "mlflow" in sys.modules:  # too late for MLFLOW_LOGGING_LEVEL: set its logger as it would have
        try:
            logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].strip().upper())
        except ValueError:  # not a level name: MLflow's business, not ours
            pass
    return True
