"""`kd-ops`: the command-line face.

Heavy libraries are imported inside the command that needs them, so `kd-ops --help` answers
at once. With `--json`, stdout carries exactly one JSON object: everything else that libraries
print (progress bars included) is sent to stderr while the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from typing import Any, Callable, Sequence

from kd_ops import __version__

EXIT_CONFIG = 2  # a config or usage error the user can fix


def _fmt(value: float) -> str:
    if value >= 1e4 or (value == int(value) and value >= 100):
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}"


def summary_table(metrics: dict[str, dict[str, float]], prefix: str = "test") -> str:
    """Models side by side (teacher, baseline, student, exports), one metric a row."""
    from kd_ops.evaluation import COMMON_METRICS, STUDENT_METRICS

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

    Called after the heavy imports: importing Lightning resets its loggers to INFO.
    """
    if verbose:
        return
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # torch/lightning internals, not the user's


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
    from kd_ops.config import ConfigError, load_config

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


def cmd_distill(args: argparse.Namespace) -> int:
    from kd_ops.config import ConfigError

    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG

    from kd_ops.pipeline import run_distillation
    from kd_ops.tracking import ui_command

    _quiet_libraries(args.verbose)

    # Config errors only visible once data or a teacher URI is loaded are one line too.
    result = _run_quietly(lambda: run_distillation(cfg), errors=(ConfigError,))
    if result is None:
        return EXIT_CONFIG
    if args.json:
        _print_json(result.to_json())
        return 0
    reg = result.registered
    gates = ", ".join(f"{g['gate']} {'pass' if g['passed'] else 'FAIL'}" for g in result.gates) or "none configured"
    champion = f"v{reg['champion']}" if reg["champion"] else "none"
    print(summary_table(result.metrics))
    print(
        f"\nregistered {reg['name']} version {reg['version']} as @{reg['alias']}  ({reg['name']}@{reg['alias']})"
        f"\ngates {reg['gates']}: {gates}"
        f"\n{'promoted to @champion' if reg['promoted'] else 'not promoted'}; champion: {champion}"
        f"\nparent run {result.runs['parent']} in experiment {result.experiment_id}"
        f"\nsee it:  {ui_command(result.tracking_uri)}"
        f"\n         then open http://127.0.0.1:5000/#/experiments/{result.experiment_id}"
    )
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """What a command reports in one line (exit 2): config and promotion errors, MLflow's own
    refusals (a store that cannot be reached, a model it will not load), a lock held too long."""
    from filelock import Timeout
    from mlflow.exceptions import MlflowException

    from kd_ops.config import ConfigError

    return ConfigError, MlflowException, Timeout


def _tracking_uri(args: argparse.Namespace) -> str:
    import os

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def cmd_evaluate(args: argparse.Namespace) -> int:

    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG

    import mlflow

    from kd_ops.model_eval import evaluate_model

    _quiet_libraries(args.verbose)
    mlflow.set_tracking_uri(cfg.tracking.uri)  # where models:/ and runs:/ URIs resolve
    edge = ("onnx", "onnx_int8") if args.edge else ()
    result = _run_quietly(lambda: evaluate_model(args.model_uri, cfg, args.split, args.teacher, edge, args.log))
    if result is None:
        return EXIT_CONFIG
    if args.json:
        _print_json(result.to_json())
        return 0
    print(summary_table(result.metrics, prefix=args.split))
    if result.run_id:
        print(f"\nlogged as run {result.run_id}")
    return 0


def _change_aliases(args: argparse.Namespace, change) -> int:
    """Run a promotion or rollback; print the resulting aliases (one line, or JSON)."""
    try:
        st = change(_tracking_uri(args))
    except _user_errors() as exc:
        print(f"kd-ops: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    prev = f"v{st.previous}" if st.previous else "none"
    print(json.dumps(st.to_json()) if args.json else f"{st.name}: champion v{st.champion}, previous {prev}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from kd_ops.promotion import promote

    return _change_aliases(args, lambda uri: promote(args.name, args.version, force=args.force, uri=uri))


def cmd_rollback(args: argparse.Namespace) -> int:
    from kd_ops.promotion import rollback

    return _change_aliases(args, lambda uri: rollback(args.name, uri=uri))


def cmd_serve(args: argparse.Namespace) -> int:
    from kd_ops.serving import ServeSettings, load_token, serve

    _quiet_libraries(args.verbose)
    try:
        token, origin = load_token(args.token_file)
        settings = ServeSettings(
            name=args.name,
            alias=args.alias,
            tracking_uri=_tracking_uri(args),
            store=args.store,
            log_predictions=not args.no_log,
            poll_interval_s=args.poll_interval,
            shadow_fraction=args.shadow_fraction,
            teacher_uri=args.teacher,
            max_body_bytes=args.max_body_bytes,
            token=token,
            sqlite_sync=args.sqlite_sync,
            allow_pickle=args.allow_pickle,
            allowed_hosts=args.allowed_host,
        )
        import torch

        torch.set_num_threads(args.threads)
        print(f"kd-ops: feedback token from {origin}", file=sys.stderr)
        serve(settings, args.host, args.port)
    except KeyboardInterrupt:  # Ctrl-C after a clean shutdown: no traceback
        return 130
    except (*_user_errors(), OSError) as exc:
        print(f"kd-ops: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    for flag, key in (
        (args.store, "store"),
        (args.window_rows, "window_rows"),
        (args.window_minutes, "window_minutes"),
    ):
        if flag is not None:
            overrides.append(f"monitor.{key}={flag}")
    if args.window_minutes is not None and args.window_rows is None:
        overrides.append("monitor.window_rows=null")
    args.set = overrides
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    from monitors.monitor import run_monitor

    _quiet_libraries(args.verbose)
    result = _run_quietly(lambda: run_monitor(cfg, record=not args.no_record, notify=not args.no_alerts))
    if result is None:
        return EXIT_CONFIG
    if args.json:
        _print_json(result.to_json())
        return 0
    w = result.window
    print(
        f"{result.model_name} v{result.model_version or '?'}: {result.status.upper()}"
        f"  ({w.get('rows', 0)} rows, {w.get('labelled_rows', 0)} labelled, {w.get('shadow_rows', 0)} shadow-scored)"
    )
    for r in result.reasons:
        print(f"  {r.status:<5} {r.message}")
    shown = [k for k in result.metrics if not k.startswith("drift_p_value_")]
    for k in shown:
        print(f"  {k:<36} {result.metrics[k]:.4f}")
    for s in result.skipped:
        print(f"  not judged: {s}")
    if result.run_id:
        print(f"logged as run {result.run_id}")
    return 0


def cmd_redistill(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    from kd_ops.redistill import last_redistillation, run_redistillation

    _quiet_libraries(args.verbose)
    if not args.ignore_cooldown:
        recent = _run_quietly(lambda: last_redistillation(cfg) or "")
        if recent is None:
            return EXIT_CONFIG
        if recent:
            print(f"kd-ops: not re-distilling: {recent} (--ignore-cooldown to go ahead)", file=sys.stderr)
            return EXIT_CONFIG
    result = _run_quietly(lambda: run_redistillation(cfg, trigger="kd-ops redistill"))
    if result is None:
        return EXIT_CONFIG
    if args.json:
        _print_json(result.to_json())
        return 0
    print(result.reason)
    rows = result.rows
    print(
        f"  transfer set: training data + {rows['production_rows'] - rows['holdout_rows']} production rows"
        f" ({rows['feedback_labels']} feedback labels, the rest labelled by the teacher);"
        f" {rows['holdout_rows']} held out to gate on"
    )
    for part, values in result.accuracy.items():
        print(f"  {part:<10} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    overrides = _overrides(args)
    from flows.deploy import check_api, deployments, serve

    api = _run_quietly(check_api)
    built = _run_quietly(lambda: deployments(args.config, overrides)) if api else None
    if built is None:
        return EXIT_CONFIG
    print(f"Prefect API {api}", file=sys.stderr)
    for d in built:
        when = [str(s.schedule) for s in d.schedules] + [f"on {t.name}" for t in d.triggers]
        print(f"serving {d.flow_name}/{d.name}: " + ", ".join(when), file=sys.stderr)
    print("Ctrl-C or SIGTERM stops; runs due meanwhile wait for the next `kd-ops deploy`", file=sys.stderr)
    serve(args.config, overrides)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    from kd_ops.config import ConfigError
    from kd_ops.evaluation import COMMON_METRICS, STUDENT_METRICS
    from kd_ops.sweep import cells, parse_grid

    try:
        grid = parse_grid(args.grid or [])
        if args.metric not in (*COMMON_METRICS, *STUDENT_METRICS):
            raise ConfigError(f"--metric {args.metric!r}: not a student metric; one of {', '.join(COMMON_METRICS)}")
    except ConfigError as exc:
        print(f"kd-ops: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    overrides = _overrides(args)
    # Every cell's config is checked before anything runs: a typo fails in one line, not in a worker.
    from kd_ops.config import load_config
    from kd_ops.sweep import as_overrides

    for cell in cells(grid):
        if _run_quietly(lambda: load_config(args.config, [*overrides, *as_overrides(cell)])) is None:
            return EXIT_CONFIG
    from flows.sweep import run_sweep

    _quiet_libraries(args.verbose)
    out = _run_quietly(lambda: run_sweep(args.config, grid, overrides, args.metric, args.workers))
    if out is None:
        return EXIT_CONFIG
    if args.json:
        _print_json(out)
    else:
        print(out["table"])
        print(f"sweep run {out['parent_run_id']}; {out['failed']} cell(s) failed")
    return 0 if not out["failed"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo
    from flows.processes import ServiceError

    try:
        return run_demo(args.config, args.dir, args.scenario, keep_servers=args.keep_servers)
    except (*_user_errors(), ServiceError, OSError, RuntimeError) as exc:  # timeouts and HTTP errors too
        print(f"kd-ops demo: {exc}\n(the logs of its servers are in {args.dir})", file=sys.stderr)
        return 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-ops", description="Knowledge distillation as a production loop.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    _config_options(p)
    p.set_defaults(func=cmd_redistill)

    p = sub.add_parser("deploy", help="serve the Prefect deployments: scheduled monitor, redistill on drift and weekly")
    p.add_argument("config", help="experiment YAML (monitor.cron/interval_minutes and redistill.* apply)")
    _config_options(p, json_help=None)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("sweep", help="a grid of distillations as parallel Prefect tasks (Dask), ranked in MLflow")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="values to try for a key (repeatable)")
    p.add_argument("--metric", default="test_accuracy", help="student metric to rank by (default test_accuracy)")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    _config_options(p, set_help="override a config key for every cell")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="the whole loop on bundled data: distil, serve, drift, alert, redistill, promote")
    p.add_argument("--config", default="examples/loop.yaml", help="experiment YAML (default examples/loop.yaml)")
    p.add_argument("--dir", default=".kd-ops/demo", help="where the demo keeps MLflow, Prefect, the log and reports")
    p.add_argument("--scenario", default="shift", help="the drift to replay (default shift)")
    p.add_argument("--keep-servers", action="store_true", help="leave the Prefect server running at the end")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The handler's own level filters too: libraries imported later set their loggers to INFO.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler])
    from kd_ops.env import apply_offline_defaults

    apply_offline_defaults()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
