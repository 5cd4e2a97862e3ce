"""Errors a user can fix, and how a library's long message is cut to the line that matters."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem a user can fix; `str()` is the whole message to show them."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's message: enough to say what failed, not a page of internals."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class DatasetUnavailable(ConfigError):
    """A registered dataset whose files are not on this machine; the message says how to get them
    (`kd_ops.data.datasets` names it too)."""
