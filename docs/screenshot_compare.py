"""Screenshot MLflow's "compare runs" view of one distillation, for the README.

A distillation logs a parent run with three nested child runs tagged `kd_ops.role` =
`teacher`, `baseline` and `student`. This script finds those children, serves the store
with `mlflow server` on a free local port, opens the compare page in headless Chromium and
writes a PNG, so the README image can be regenerated instead of hand-cropped.

Run from the repository root after `make demo` (needs Debian's `chromium`):

    .venv/bin/python docs/screenshot_compare.py --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

import requests
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kd_ops.registry.tracking import TAG_ROLE, sqlite_path

ROLES = ("teacher", "baseline", "student")
# The UI opens its Assistant side panel on first load when served from localhost, covering a
# third of the page. Chromium reaches the server under this name instead (resolved to
# 127.0.0.1 by --host-resolver-rules), which the server is told to accept.
HOST = "mlflow.kd-ops.test"
CHROMIUM_FLAGS = [
    *"--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking".split(),
    *"--disable-component-update --disable-sync --hide-scrollbars".split(),
    f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
]
MIN_PNG_BYTES = 20_000
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def find_parent(client: MlflowClient, experiment: str | None) -> Run:
    """The newest parent run, in experiment `experiment` or in any experiment when None."""
    exps = client.search_experiments(filter_string=f"name = '{experiment}'" if experiment else None)
    ids = [e.experiment_id for e in exps]
    runs = (
        client.search_runs(ids, f"tags.`{TAG_ROLE}` = 'parent'", order_by=["start_time DESC"], max_results=1)
        if ids
        else []
    )
    if not runs:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        sys.exit(f"error: no run tagged {TAG_ROLE}='parent' in {where} of the store; run `make demo` first")
    return runs[0]


def find_children(client: MlflowClient, parent: Run) -> list[Run]:
    """The teacher, baseline and student runs nested under `parent`, in that order."""
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_role = {r.data.tags.get(TAG_ROLE): r for r in runs}
    missing = [role for role in ROLES if role not in by_role]
    if missing:
        sys.exit(f"error: parent run {parent.info.run_id} has no child run(s) {', '.join(missing)}")
    return [by_role[role] for role in ROLES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, log: IO[bytes]) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`, output to `log`; returns once /health answers."""
    artifacts = sqlite_path(uri).resolve().parent / "mlartifacts"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    network = f"--host 127.0.0.1 --port {port} --workers 1 --allowed-hosts {HOST}:{port}"
    cors = f"--cors-allowed-origins http://{HOST}:{port}"
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", uri, "--artifacts-destination", str(artifacts)]
    cmd += [*network.split(), *cors.split()]
    server = subprocess.Popen(cmd, env={**os.environ, **QUIET_ENV}, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(120):
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"error: mlflow server exited with code {server.returncode}:\n{log.read()[-2000:].decode()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop(server)
    sys.exit("error: mlflow server did not answer /health within 60 s")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()


def compare_url(port: int, runs: list[Run]) -> str:
    ids = json.dumps([r.info.run_id for r in runs])
    exps = json.dumps(sorted({r.info.experiment_id for r in runs}))
    return f"http://{HOST}:{port}/#/compare-runs?runs={quote(ids)}&experiments={quote(exps)}"


def screenshot(chromium: str, url: str, out: Path, size: str, budget_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd-ops-chromium-") as profile:
        page = [f"--window-size={size}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}"]
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *page, url]
        try:
            subprocess.run(cmd, capture_output=True, timeout=180)
        except subprocess.TimeoutExpired:
            pass  # reported just below as a missing screenshot
    if not out.is_file() or out.stat().st_size < MIN_PNG_BYTES:
        sys.exit(f"error: chromium wrote no usable screenshot at {out} (missing or < 20 kB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="sqlite:/// store (default: %(default)s)")
    p.add_argument("--parent", help="parent run id (default: newest run tagged kd_ops.role=parent)")
    p.add_argument("--experiment", help="look for the parent only in this experiment (default: all)")
    p.add_argument("--out", type=Path, default=Path("docs/img/mlflow-compare.png"))
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--window-size", default="1600,2040", help="W,H in pixels (default: %(default)s)")
    p.add_argument("--virtual-time-budget", type=int, default=20000, help="ms (default: %(default)s)")
    args = p.parse_args()

    db = sqlite_path(args.tracking_uri)
    if db is None or not db.is_file():
        sys.exit(f"error: {args.tracking_uri} is not a sqlite:/// URI of an existing database")
    if shutil.which(args.chromium) is None:
        sys.exit(f"error: chromium not found at {args.chromium}; `apt-get install chromium` or pass --chromium")
    client = MlflowClient(args.tracking_uri)
    try:
        parent = client.get_run(args.parent) if args.parent else find_parent(client, args.experiment)
    except MlflowException as e:
        sys.exit(f"error: cannot read the parent run: {e.message}")
    children = find_children(client, parent)

    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = start_server(args.tracking_uri, port, log)
        try:
            screenshot(args.chromium, compare_url(port, children), args.out, args.window_size, args.virtual_time_budget)
        finally:
            stop(server)
    print(args.out)


if __name__ == "__main__":
    main()
