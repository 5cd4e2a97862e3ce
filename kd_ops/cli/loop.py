"""`kd-ops redistill`, `kd-ops deploy` and `kd-ops demo`: the loop."""

from __future__ import annotations

import argparse
import sys

from kd_ops.cli.common import (
    EXIT_CONFIG,
    _config,
    _overrides,
    _print_json,
    _quiet_libraries,
    _run_quietly,
    _user_errors,
)


def cmd_redistill(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    from kd_ops.pipeline.redistill import last_redistillation, run_redistillation

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


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo
    from flows.processes import ServiceError

    try:
        return run_demo(args.config, args.dir, args.scenario, keep_servers=args.keep_servers)
    except (*_user_errors(), ServiceError, OSError, RuntimeError) as exc:  # timeouts and HTTP errors too
        print(f"kd-ops demo: {exc}\n(the logs of its servers are in {args.dir})", file=sys.stderr)
        return 1
