"""`kd-ops`: the command-line face.

Heavy libraries are imported inside the command that needs them, so `kd-ops --help` answers
at once. With `--json`, stdout carries exactly one JSON object: everything else that libraries
print (progress bars included) is sent to stderr while the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from kd_ops.cli.common import ALLOW_PICKLE_HELP, _config_options
from kd_ops.cli.distill import cmd_distill, cmd_sweep
from kd_ops.cli.evaluate import cmd_evaluate
from kd_ops.cli.loop import cmd_demo, cmd_deploy, cmd_redistill, cmd_replay
from kd_ops.cli.monitor import cmd_monitor
from kd_ops.cli.registry import cmd_promote, cmd_rollback
from kd_ops.cli.serve import cmd_serve
from kd_ops.core.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-ops", description="Knowledge distillation as a production loop.")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and all that libraries print (in the processes kd-ops starts too)",
    )
    parser.add_argument("--version", action="version", version=f"kd-ops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train teacher, baseline and distilled student; register the student")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    _config_options(p, json_help="print one JSON object with metrics, runs and registration")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="score a model URI on a split: quality, slices, robustness, efficiency")
    p.add_argument("model_uri", help="an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...)")
    p.add_argument("--config", required=True, help="experiment YAML whose data, seed and evaluation settings apply")
    p.add_argument("--split", default="test", help="train, transfer, val or test (default test)")
    p.add_argument("--teacher", help="a teacher model URI: adds agreement, retention, compression, speedup")
    p.add_argument("--edge", action="store_true", help="also score ONNX and int8 ONNX exports (onnxruntime)")
    p.add_argument("--log", action="store_true", help="log the evaluation as an MLflow run")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    _config_options(p)
    p.set_defaults(func=cmd_evaluate)

    for name, func, helptext in (
        ("promote", cmd_promote, "make VERSION the champion (its gates must have passed)"),
        ("rollback", cmd_rollback, "give the champion alias back to the previous champion"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", help="registered model name")
        if name == "promote":
            p.add_argument("version", help="model version to promote")
            p.add_argument("--force", action="store_true", help="promote even without passed gates (recorded)")
        p.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
        )
        p.add_argument("--json", action="store_true", help="print the aliases as one JSON object")
        p.set_defaults(func=func)

    p = sub.add_parser("monitor", help="judge the latest window of the prediction log: ok, warn or alert, and why")
    p.add_argument("config", help="experiment YAML (its registry.name, tracking and monitor sections apply)")
    p.add_argument("--window-rows", type=int, help="the latest N predictions (overrides monitor.window_rows)")
    p.add_argument("--window-minutes", type=float, help="the predictions of the last M minutes")
    p.add_argument("--store", help="prediction log URL (overrides monitor.store)")
    p.add_argument("--no-alerts", action="store_true", help="judge and record, but send no alert")
    p.add_argument("--no-record", action="store_true", help="no MLflow run, no Evidently workspace entry")
    _config_options(p)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("serve", help="serve NAME@ALIAS over HTTP, logging every prediction; swaps in new champions")
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", default="champion", help="alias to serve and watch (default champion)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the Host header may carry besides --host (repeatable; '*': any); bound to a loopback"
        " address its names are allowed, bound to 0.0.0.0 or :: at least one is required",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--store", default="sqlite:///predictions.db", help="prediction log, a SQLAlchemy URL")
    p.add_argument("--no-log", action="store_true", help="do not log predictions (feedback and shadow then refused)")
    p.add_argument(
        "--no-metrics", action="store_true", help="no Prometheus metrics: no /metrics and no request instrumentation"
    )
    p.add_argument("--poll-interval", type=float, default=10.0, help="seconds between alias checks (default 10)")
    p.add_argument("--shadow-fraction", type=float, default=0.0, help="share of requests the teacher also scores")
    p.add_argument("--teacher", help="teacher model URI for the shadow (default: the served version's lineage)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (default 4 MiB)")
    p.add_argument(
        "--token-file", help="file with the feedback token (default $KD_OPS_TOKEN, else .kd-ops/serve-token, created)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for inference (default 1)")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP + " (the shadow teacher too)")
    p.add_argument(
        "--sqlite-sync", default="FULL", help="SQLite synchronous mode: FULL (default, power-safe) or NORMAL"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("redistill", help="distil a new student on teacher-labelled recent traffic; promote if better")
    p.add_argument("config", help="experiment YAML (its registry, monitor.store and redistill sections apply)")
    p.add_argument("--ignore-cooldown", action="store_true", help="run even within redistill.cooldown_minutes")
    p.add_argument(
        "--key",
        help="re-distil under this key: a rerun with the same key decides on the candidate an earlier attempt"
        " registered instead of training again (default: a new key)",
    )
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    _config_options(p)
    p.set_defaults(func=cmd_redistill)

    p = sub.add_parser("deploy", help="serve the Prefect deployments: scheduled monitor, redistill on drift and weekly")
    p.add_argument("config", help="experiment YAML (monitor.cron/interval_minutes and redistill.* apply)")
    _config_options(p, json_help=None)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("replay", help="send a table's later rows to kd-ops serve window by window, with late labels")
    p.add_argument("config", help="experiment YAML (its data, registry, tracking and monitor sections apply)")
    p.add_argument("--from", dest="start", help="first window, e.g. 2013-04 (default replay.start)")
    p.add_argument("--to", dest="end", help="last window, inclusive, e.g. 2013-12 (default replay.end)")
    p.add_argument("--window", choices=["month", "week", "day"], help="window length (default replay.window)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the running kd-ops serve (default :8080)")
    p.add_argument("--label-share", type=float, help="share of predictions that get a label (replay.label_share)")
    p.add_argument("--label-delay", type=int, help="windows until a label arrives (replay.label_delay)")
    p.add_argument("--rows-per-window", type=int, help="send this many rows of each window (replay.rows_per_window)")
    p.add_argument("--seed", type=int, help="which rows are drawn and labelled (default: the config's seed)")
    p.add_argument(
        "--loop",
        default="deployments",
        choices=["deployments", "inline"],
        help="who acts after each window: the kd-ops deploy deployments (default) or the flows in this process",
    )
    p.add_argument("--token-file", help="file with the server's feedback token (default $KD_OPS_TOKEN)")
    _config_options(p, json_help="print the windows' reports as one JSON object")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("sweep", help="a grid of distillations as parallel Prefect tasks (Dask), ranked in MLflow")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="values to try for a key (repeatable)")
    p.add_argument("--metric", default="test_accuracy", help="student metric to rank by (default test_accuracy)")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    _config_options(p, set_help="override a config key for every cell")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="the whole loop on bundled data: distil, serve, drift, alert, redistill, promote")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", help="experiment YAML (default examples/loop.yaml)")
    which.add_argument(
        "--example",
        help="a config of examples/ by name: loop (drift made here) or flights (a real year, replayed month by month)",
    )
    p.add_argument("--dir", default=".kd-ops/demo", help="where the demo keeps MLflow, Prefect, the log and reports")
    p.add_argument("--scenario", default="shift", help="the drift to replay (default shift)")
    p.add_argument("--keep-servers", action="store_true", help="leave the Prefect server running at the end")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kd_ops.core.env import apply_offline_defaults, apply_quiet_defaults

    apply_offline_defaults()
    # Before any heavy import (MLflow reads its level when imported). Without -v, library chatter is
    # hidden here and, through KD_OPS_QUIET, in the processes this one starts; KD_OPS_QUIET=0 in the
    # environment (set by `kd-ops -v demo` for its `kd-ops serve` and `kd-ops deploy`) is -v.
    args.verbose = not apply_quiet_defaults(args.verbose)
    # The handler's own level filters too: libraries imported later set their loggers to INFO.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
