"""`kd-ops serve`."""

from __future__ import annotations

import argparse
import sys

from kd_ops.cli.common import EXIT_CONFIG, _quiet_libraries, _tracking_uri, _user_errors


def cmd_serve(args: argparse.Namespace) -> int:
    from kd_ops.serving.server import serve
    from kd_ops.serving.state import ServeSettings, load_token

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
            metrics=not args.no_metrics,
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
