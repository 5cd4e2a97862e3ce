"""How fast does `kd-ops serve` answer, what does the durable prediction log cost, and how does it
compare with `mlflow models serve` of the same model version?

One registered student (the digits recipe, `examples/digits.yaml`, trained briefly: serving speed
depends on the architecture, not on how well it learnt). Three servers, each a separate process on
127.0.0.1 with one worker and one torch thread, started and stopped in turn, `--repeats` rounds
interleaved so drift in the machine hits all three alike:

  kd-ops, log on    `kd-ops serve NAME` (SQLite WAL, synchronous=FULL: every answer is fsynced)
  kd-ops, log off   `kd-ops serve NAME --no-log`
  mlflow            `mlflow models serve -m models:/NAME/V --env-manager local --workers 1`

Load: `--clients` concurrent keep-alive connections from one asyncio client process (aiohttp on
uvloop), each sending the next request as soon as the last is answered, `--batch` test rows per
request; `--warmup` seconds unmeasured, then `--seconds` measured. Bounded in time, not in count.
The client shares the machine's cores with the server, as a sidecar would.

Reports throughput (rows/s, mean ± std over rounds) and latency p50/p99 (medians over rounds),
checks that the log holds every row the log-on server answered, and writes
`bench/results/serve_load.json` and `.md`.

    python bench/serve_load.py                 # 16 and 64 clients, batch 1, 3 rounds of 10 s (~7 minutes)
    python bench/serve_load.py --batch 32 --out bench/results/serve_load_bs32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from shared import RESULTS, digits_recipe, mean_std, save_results  # bench/shared.py (bench/ is on sys.path when run)

VARIANTS = ("kd-ops, log on", "kd-ops, log off", "mlflow models serve")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def distil_student(root: Path) -> tuple[str, str, str, np.ndarray]:
    """A digits student registered in a fresh SQLite registry: (tracking URI, name, version, test rows)."""
    from kd_ops.config import config_from_dict
    from kd_ops.pipeline import run_distillation

    raw = digits_recipe(root, "bench-serve")
    result = run_distillation(config_from_dict(raw, "serve-load"))
    x, _ = result.datamodule.arrays("test")
    return raw["tracking"]["uri"], "bench-serve", result.registered["version"], x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; `path` and `body` are what a request to it looks like."""

    def __init__(self, variant: str, uri: str, name: str, version: str, rows: list, root: Path, extra: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{root}/predictions-{self.port}.db"
        bin_dir = Path(sys.executable).parent
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # mlflow runs `uvicorn` from PATH
        env = {**os.environ, **ONE_THREAD, "PATH": path, "MLFLOW_TRACKING_URI": uri, "KD_OPS_TOKEN": "bench"}
        if variant.startswith("kd-ops"):
            cmd = [str(bin_dir / "kd-ops"), "serve", name, "--port", str(self.port), "--store", self.store]
            cmd += ["--threads", "1", "--tracking-uri", uri, *extra] + (["--no-log"] if "off" in variant else [])
            self.path, self.health = "/predict", "/health"
            self.body = json.dumps({"rows": rows}).encode()
        else:
            cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}"]
            cmd += ["--env-manager", "local", "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port)]
            self.path, self.health = "/invocations", "/ping"
            self.body = json.dumps({"inputs": rows}).encode()
        self.log = open(root / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{variant} exited: {(root / f'server-{self.port}.log').read_text()[-2000:]}")
            try:
                if requests.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.3)
        raise RuntimeError(f"{variant} did not become healthy in 180 s")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


async def _load(server: Server, clients: int, warmup: float, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    ok = errors = answered_total = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from, until = start + warmup, start + warmup + seconds

        async def client() -> None:
            nonlocal ok, errors, answered_total
            while (t0 := time.perf_counter()) < until:
                try:
                    async with session.post(server.url + server.path, data=server.body, headers=headers) as r:
                        await r.read()
                        good = r.status == 200
                except aiohttp.ClientError:
                    good = False
                t1 = time.perf_counter()
                answered_total += good
                if t0 >= measure_from and t1 <= until:
                    if good:
                        ok += 1
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    lat = np.array(latencies) * 1e3
    return {
        "requests_per_s": ok / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "errors": errors,
        "answered_requests": answered_total,
    }


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = [
        f"`python bench/serve_load.py --clients {args.clients} --batch {args.batch} --seconds {args.seconds:g}"
        f" --repeats {args.repeats}`: keep-alive clients from one asyncio process, {args.batch} row(s) per"
        f" request, {args.seconds:g} s measured after {args.warmup:g} s warm-up, {args.repeats} interleaved rounds;"
        f" {os.cpu_count()} cores ({platform.processor() or platform.machine()}), client and servers on the same"
        " cores; one worker and one torch thread per server.",
        "",
        "| clients | server | rows/s (mean ± std) | requests/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows_per_s = {key: [r["requests_per_s"] * args.batch for r in runs] for key, runs in results.items()}
    for key, runs in results.items():
        clients, variant = key.split(" | ")
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        lines.append(
            f"| {clients} | {variant} | {mean_std(rows_per_s[key], ',.0f')}"
            f" | {mean_std([r['requests_per_s'] for r in runs], ',.0f')}"
            f" | {p50:.2f} | {p99:.2f} | {sum(r['errors'] for r in runs)} |"
        )
    lines.append("")
    for clients in args.client_levels:
        mean = {
            v: statistics.fmean(rows_per_s[f"{clients} | {v}"]) for v in VARIANTS if f"{clients} | {v}" in rows_per_s
        }
        on, off = mean[VARIANTS[0]], mean[VARIANTS[1]]
        line = f"- {clients} clients: logging costs {1 - on / off:.1%} of throughput (target: at most 10%)"
        if VARIANTS[2] in mean:
            ratio = on / mean[VARIANTS[2]]
            line += f"; kd-ops with logging serves {ratio:.2f}x the rows/s of `mlflow models serve` (target: 2x)"
        lines.append(line)
    lines.append(f"- every row a log-on server answered is in its log: {args.log_complete}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="16,64", help="concurrent clients; a comma list runs each")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--serve-args", default="", help="extra `kd-ops serve` arguments, e.g. '--sqlite-sync NORMAL'")
    parser.add_argument("--out", default=str(RESULTS / "serve_load"), help="path prefix of the .json and .md")
    args = parser.parse_args()

    from kd_ops.env import apply_offline_defaults

    apply_offline_defaults()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    variants = VARIANTS[:2] if args.skip_mlflow else VARIANTS
    with tempfile.TemporaryDirectory(prefix="kd-ops-serve-load-") as tmp:
        root = Path(tmp)
        print("distilling a digits student to serve ...", file=sys.stderr)
        uri, name, version, x = distil_student(root)
        rows = x[: args.batch].tolist()
        args.client_levels = [int(c) for c in str(args.clients).split(",")]
        results: dict[str, list[dict]] = {f"{c} | {v}": [] for c in args.client_levels for v in variants}
        complete = True
        for rnd in range(args.repeats):
            for clients, variant in ((c, v) for c in args.client_levels for v in variants):
                server = Server(variant, uri, name, version, rows, root, args.serve_args.split())
                try:
                    out = asyncio.run(_load(server, clients, args.warmup, args.seconds))
                finally:
                    server.stop()
                if variant == VARIANTS[0]:
                    from kd_ops.prediction_log import read_predictions

                    stored = len(read_predictions(server.store))
                    complete &= stored == out["answered_requests"] * args.batch
                    out["stored_rows"] = stored
                results[f"{clients} | {variant}"].append(out)
                print(
                    f"round {rnd}: {clients:>3} clients {variant:<20}"
                    f" {out['requests_per_s'] * args.batch:>7,.0f} rows/s,"
                    f" p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, errors {out['errors']}",
                    file=sys.stderr,
                )
        args.log_complete = complete
    text = report(results, args)
    print(text)
    save_results(args.out, text, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
