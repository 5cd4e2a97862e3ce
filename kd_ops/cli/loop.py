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
        recent = _run_quietly(lambda: last_redistillation(cfg, args.key) or "")
        if recent is None:
            return EXIT_CONFIG
        if recent:
            print(f"kd-ops: not re-distilling: {recent} (--ignore-cooldown to go ahead)", file=sys.stderr)
            return EXIT_CONFIG
    result = _run_quietly(lambda: run_redistillation(cfg, trigger="kd-ops redistill", key=args.key))
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
    from pathlib import Path

    from flows.demo import run_demo
    from flows.processes import ServiceError

    config = args.config or f"examples/{args.example or 'loop'}.yaml"
    if not Path(config).exists():
        where = f"--example {args.example}: no {config}" if args.example else f"--config {config}: no such file"
        print(f"kd-ops demo: {where} (run it from the kd-ops checkout, or give --config)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        from flows.demo import run_flights_demo
        from kd_ops.config.loading import load_config

        if load_config(config).replay.start:
            return run_flights_demo(config, args.dir, keep_servers=args.keep_servers)
        return run_demo(config, args.dir, args.scenario, keep_servers=args.keep_servers)
    except (*_user_errors(), ServiceError, OSError, RuntimeError) as exc:  # timeouts and HTTP errors too
        print(f"kd-ops demo: {exc}\n(the logs of its servers are in {args.dir})", file=sys.stderr)
        return 1


def _replay_token(path: str | None) -> str | None:
    """The feedback token: $KD_OPS_TOKEN, else the file (never created here: the server makes it)."""
    import os
    from pathlib import Path

    from kd_ops.core.errors import ConfigError
    from kd_ops.serving.state import DEFAULT_TOKEN_FILE, TOKEN_ENV

    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    file = Path(path or DEFAULT_TOKEN_FILE).expanduser()
    if file.exists() and file.read_text().strip():
        return file.read_text().strip()
    if path:
        raise ConfigError(f"--token-file {file}: no such file, or it is empty")
    return None


def cmd_replay(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return EXIT_CONFIG
    from flows.replay import DeployedLoop, InlineLoop, Server, replay

    _quiet_libraries(args.verbose)

    def work():
        token = _replay_token(args.token_file)
        if token is None and (args.label_share if args.label_share is not None else cfg.replay.label_share) > 0:
            from kd_ops.core.errors import ConfigError

            raise ConfigError("feedback needs the server's token: set $KD_OPS_TOKEN or --token-file")
        loop = InlineLoop(args.config, _overrides(args)) if args.loop == "inline" else DeployedLoop(cfg)
        on_window = None if args.json else (lambda r: print(r.line(), flush=True))
        r = cfg.replay.model_copy(
            update={
                k: v
                for k, v in {
                    "start": args.start,
                    "end": args.end,
                    "window": args.window,
                    "label_share": args.label_share,
                    "label_delay": args.label_delay,
                    "rows_per_window": args.rows_per_window,
                }.items()
                if v is not None
            }
        )
        return replay(
            cfg,
            Server(args.url, token),
            loop,
            r,
            seed=cfg.seed if args.seed is None else args.seed,
            on_window=on_window,
        )

    reports = _run_quietly(work)
    if reports is None:
        return EXIT_CONFIG
    if args.json:
        _print_json({"windows": [r.to_json() for r in reports]})
    return 0
