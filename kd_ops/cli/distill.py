"""`kd-ops distill` and `kd-ops sweep`."""

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
    summary_table,
)


def cmd_distill(args: argparse.Namespace) -> int:
    from kd_ops.core.errors import ConfigError

    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG

    from kd_ops.pipeline.distillation import run_distillation
    from kd_ops.registry.tracking import ui_command

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


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    from kd_ops.core.errors import ConfigError
    from kd_ops.evaluation.metrics import COMMON_METRICS, STUDENT_METRICS
    from kd_ops.pipeline.sweep import cells, parse_grid

    try:
        grid = parse_grid(args.grid or [])
        if args.metric not in (*COMMON_METRICS, *STUDENT_METRICS):
            raise ConfigError(f"--metric {args.metric!r}: not a student metric; one of {', '.join(COMMON_METRICS)}")
    except ConfigError as exc:
        print(f"kd-ops: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    overrides = _overrides(args)
    # Every cell's config is checked before anything runs: a typo fails in one line, not in a worker.
    from kd_ops.config.loading import load_config
    from kd_ops.pipeline.sweep import as_overrides

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
