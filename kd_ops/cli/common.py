"""What every command shares: loading the config with --set, one-line errors, quiet libraries, JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Callable

EXIT_CONFIG = 2  # a config or usage error the user can fix


def _fmt(value: float) -> str:
    if value >= 1e4 or (value == int(value) and value >= 100):
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}"


def summary_table(metrics: dict[str, dict[str, float]], prefix: str = "test") -> str:
    """Models side by side (teacher, baseline, student, exports), one metric a row."""
    from kd_ops.evaluation.metrics import COMMON_METRICS, STUDENT_METRICS

    roles = list(metrics)
    common = [k.replace("test_", f"{prefix}_", 1) if k.startswith("test_") else k for k in COMMON_METRICS]
    keys = [*common, "train_time_s", *STUDENT_METRICS]
    keys = [k for k in keys if any(k in metrics[r] for r in roles)]
    width = max(len(k) for k in keys) + 2
    col = max(14, *(len(r) + 2 for r in roles))
    lines = [f"{'metric':<{width}}" + "".join(f"{r:>{col}}" for r in roles)]
    lines.append("-" * len(lines[0]))
    for k in keys:
        cells = "".join(f"{_fmt(metrics[r][k]) if k in metrics[r] else '-':>{col}}" for r in roles)
        lines.append(f"{k:<{width}}{cells}")
    return "\n".join(lines)


def _quiet_libraries(verbose: bool) -> None:
    """Lightning's start-up banners and tips are noise at the command line.

    Called after the heavy imports: importing Lightning resets its loggers to INFO. What must be
    set before them (MLflow's level, Lightning's rank-zero loggers) `main()` has set through
    `kd_ops.core.env.apply_quiet_defaults`; `-v` or KD_OPS_QUIET=0 keeps everything.
    """
    from kd_ops.core.env import apply_quiet_defaults

    if not apply_quiet_defaults(verbose):
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _overrides(args: argparse.Namespace) -> list[str]:
    """`--set` overrides, with `--tracking-uri` and then `--allow-pickle` (where the command has it) last."""
    return (
        list(args.set or [])
        + ([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [])
        + (["allow_pickle=true"] if getattr(args, "allow_pickle", False) else [])
    )


ALLOW_PICKLE_HELP = (
    "load model files whose loading runs code stored in them (pickle models, pt2 with pickled records, "
    "untrusted skops types); only for models from someone you trust (config: allow_pickle)"
)


def _config(args: argparse.Namespace):
    """The experiment config with `--set` and `--tracking-uri` applied; None (message printed) if invalid."""
    from kd_ops.config.loading import load_config
    from kd_ops.core.errors import ConfigError

    try:
        return load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"kd-ops: {exc}", file=sys.stderr)
        return None


def _run_quietly(work: Callable[[], Any], errors: tuple[type[Exception], ...] | None = None) -> Any:
    """`work()` with whatever libraries print sent to stderr, so stdout holds only the command's own
    output. A user error (`errors`, by default `_user_errors()`) is one line on stderr and gives None."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return work()
    except errors or _user_errors() as exc:
        print(f"kd-ops: {exc}", file=sys.stderr)
        return None


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _user_errors() -> tuple[type[Exception], ...]:
    """What a command reports in one line (exit 2): config and promotion errors, MLflow's own
    refusals (a store that cannot be reached, a model it will not load), a lock held too long."""
    from filelock import Timeout
    from mlflow.exceptions import MlflowException

    from kd_ops.core.errors import ConfigError

    return ConfigError, MlflowException, Timeout


def _tracking_uri(args: argparse.Namespace) -> str:
    import os

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _config_options(
    p: argparse.ArgumentParser,
    json_help: str | None = "print one JSON object",
    set_help: str = "override a config key (repeatable)",
) -> None:
    """`--set`, `--tracking-uri` and (unless `json_help` is None) `--json`, as every config command has them."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides tracking.uri)")
    if json_help is not None:
        p.add_argument("--json", action="store_true", help=json_help)
