"""`kd-ops`: the command-line face over kd_ops, monitors and flows, one module per command group.

`main` is the console script (`kd-ops = kd_ops.cli:main`); `python -m kd_ops.cli` is the same.
Heavy libraries are imported inside the command that needs them, so `kd-ops --help` answers at once.
"""

from kd_ops.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
