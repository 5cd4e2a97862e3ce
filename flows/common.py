"""What every flow shares: loading the config, and which failures are worth a retry."""

from __future__ import annotations

from typing import Any

from kd_ops.config import ExperimentConfig, load_config

RETRIES = 3
RETRY_DELAYS = [2, 10, 30]  # seconds: a tracking server restarting, a database briefly locked

# Words of the errors a tracking server, a database or the network give while they are briefly
# away; anything else (a bad config, a missing model, a failing gate) is final and not retried.
_TRANSIENT_WORDS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "max retries exceeded",
    "temporarily unavailable",
    "timed out",
    "database is locked",
    "503",
    "502",
    "504",
)


def is_transient(exc: BaseException | None) -> bool:
    """A connection-level failure anywhere in the exception's chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(word in str(exc).lower() for word in _TRANSIENT_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry connection trouble, fail fast on everything else."""
    try:
        state.result(raise_on_failure=True)
    except Exception as exc:  # the task's own exception, re-raised from its state
        return is_transient(exc)
    return False


def config(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(path, list(overrides or []))
