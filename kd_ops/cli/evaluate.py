"""`kd-ops evaluate`: a model URI scored on a split."""

from __future__ import annotations

import argparse

from kd_ops.cli.common import EXIT_CONFIG, _config, _print_json, _quiet_libraries, _run_quietly, summary_table


def cmd_evaluate(args: argparse.Namespace) -> int:

    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG

    import mlflow

    from kd_ops.evaluation.evaluate import evaluate_model

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
