"""`kd-ops promote` and `kd-ops rollback`: the champion alias."""

from __future__ import annotations

import argparse
import json
import sys

from kd_ops.cli.common import EXIT_CONFIG, _tracking_uri, _user_errors


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
    from kd_ops.registry.promotion import promote

    return _change_aliases(args, lambda uri: promote(args.name, args.version, force=args.force, uri=uri))


def cmd_rollback(args: argparse.Namespace) -> int:
    from kd_ops.registry.promotion import rollback

    return _change_aliases(args, lambda uri: rollback(args.name, uri=uri))
