"""What every flow shares: loading the config, and which failures are worth a retry."""

from __future__ import annotations

import re
from typing import Any

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.loading import load_config
from kd_ops.core.env import apply_quiet_defaults
from kd_ops.core.errors import ConfigError

# A Prefect flow run may be a process of its own (started by `kd-ops deploy`): it hides library
# chatter as the kd-ops that started it does (KD_OPS_QUIET, inherited), before MLflow is imported.
apply_quiet_defaults()

RETRIES = 3
RETRY_DELAYS = [2, 10, 30]  # seconds: a tracking server restarting, a database briefly locked

# What a tracking server, a database or the network say while they are briefly away; anything
# else (a bad config, a missing model, a failing gate) is final and not retried.
_TRANSIENT = re.compile(
    r"connection (refused|reset|aborted)|max retries exceeded|temporarily[ _]unavailable|timed out"
    r"|database is locked|(status( code)?|http|error code)\W{0,3}50[234]\b"
    r"|\b50[234] (server error|bad gateway|service unavailable|gateway timeout)",
    re.IGNORECASE,
)
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR"}


def is_transient(exc: BaseException | None) -> bool:
    """A connection-level failure anywhere in the exception's chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if getattr(exc, "error_code", None) in _TRANSIENT_CODES:  # MlflowException
            return True
        if not isinstance(exc, ConfigError) and _TRANSIENT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn` (a plain function: Prefect ignores partials and callables):
    retry connection trouble, fail fast on everything else. The failed state holds the task's
    own exception."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


def config(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(path, list(overrides or []))
