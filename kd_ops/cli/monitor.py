"""`kd-ops monitor`: one verdict on the latest window of the prediction log."""

from __future__ import annotations

import argparse

from kd_ops.cli.common import EXIT_CONFIG, _config, _print_json, _quiet_libraries, _run_quietly


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
