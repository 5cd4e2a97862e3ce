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

Reports throughput (rows/s) and latency p50/p99, mean ± std over rounds; CPU time (user + system,
psutil) of each server process and of its children (the log writer) over the measured window, per
row: CPU µs per prediction (server, log off) and per logged row (writer + the server's extra);
the disk's fsync latency (with synchronous=FULL it bounds the commit rate); checks that the log
holds every row the log-on server answered, and writes `bench/results/serve_load.json` and `.md`.

`--metrics-cost` measures only what the Prometheus metrics cost: two kd-ops servers with the log
on, one with metrics (the default, its /metrics scraped every `--scrape-interval` s during the
load, as Prometheus would) and one with `--no-metrics`, both up for the whole run; the load
alternates between them, `--warmup` + `--seconds` per slice, in ABBA order (metrics first in
even rounds, last in odd ones) so drift in a shared machine hits both alike; each round is one
pair. It reports rows/s, latency and CPU per row of each, the cost per pair (mean ± std), checks
that the metrics counted every answered row, and writes its own section ("Metrics cost") of the
same `.md` and key (`metrics_cost`) of the same `.json`, keeping the rest of both (and a full run
keeps that section).

    python bench/serve_load.py --repeats 5     # 16 and 64 clients, batch 1, 5 rounds of 10 s (~12 minutes)
    python bench/serve_load.py --batch 32 --out bench/results/serve_load_bs32
    python bench/serve_load.py --metrics-cost --clients 16 --repeats 12 --seconds 8   # ~6 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
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
NO_METRICS = "kd-ops, log on, no metrics"  # `--metrics-cost`: beside VARIANTS[0], which has metrics on
METRICS_SECTION = "## Metrics cost"  # the `--metrics-cost` section of the .md
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def distil_student(root: Path) -> tuple[str, str, str, np.ndarray]:
    """A digits student registered in a fresh SQLite registry: (tracking URI, name, version, test rows)."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

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
            cmd += ["--threads", "1", "--tracking-uri", uri, *extra] + (["--no-log"] if "log off" in variant else [])
            cmd += ["--no-metrics"] if "no metrics" in variant else []
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


def _cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by `pid`, by its children (all descendants), and by this process."""
    import psutil

    def used(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
        except psutil.Error:  # gone meanwhile
            return 0.0
        return t.user + t.system

    proc = psutil.Process(pid)
    me = psutil.Process()
    return {
        "server": used(proc),
        "children": sum(used(c) for c in proc.children(recursive=True)),
        "client": used(me),
    }


async def _load(server: Server, clients: int, warmup: float, seconds: float, scrape_every: float = 0.0) -> dict:
    """`scrape_every`: seconds between GETs of /metrics during the load (0: none)."""
    import aiohttp

    latencies: list[float] = []
    ok = errors = answered_total = scrapes = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    cpu: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from, until = start + warmup, start + warmup + seconds

        async def meter() -> None:
            # CPU seconds (user + system) of the server and of its children (the log writer, mlflow's
            # workers) over exactly the measured window; the client's own as well, for reference.
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            before = _cpu(server.proc.pid)
            await asyncio.sleep(max(0.0, until - time.perf_counter()))
            after = _cpu(server.proc.pid)
            cpu.update({k: after[k] - before.get(k, 0.0) for k in after})

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

        async def scraper() -> None:
            nonlocal scrapes
            while scrape_every and time.perf_counter() < until:
                async with session.get(server.url + "/metrics") as r:
                    await r.read()
                    scrapes += r.status == 200
                await asyncio.sleep(scrape_every)

        await asyncio.gather(meter(), scraper(), *(client() for _ in range(clients)))
    lat = np.array(latencies) * 1e3
    return {
        "requests_per_s": ok / seconds,
        "cpu_s": cpu,  # {"server", "children", "client"}: CPU seconds over the measured window
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "errors": errors,
        "answered_requests": answered_total,
        "scrapes": scrapes,
    }


def _us_per_row(run: dict, part: str, args: argparse.Namespace) -> float:
    """CPU microseconds of `part` ("server", "children") per row answered in the measured window."""
    rows = run["requests_per_s"] * args.seconds * args.batch
    return run.get("cpu_s", {}).get(part, float("nan")) / rows * 1e6 if rows else float("nan")


def cpu_costs(results: dict[str, list[dict]], clients: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per round (log on and log off paired within a round): CPU us per prediction (the log-off
    server), and per logged row: the writer's, the server's extra over log off, and their sum."""
    on, off = results.get(f"{clients} | {VARIANTS[0]}", []), results.get(f"{clients} | {VARIANTS[1]}", [])
    out: dict[str, list[float]] = {"prediction": [], "writer": [], "server_extra": [], "logged_row": []}
    for run_on, run_off in zip(on, off):
        pred = _us_per_row(run_off, "server", args)
        writer = _us_per_row(run_on, "children", args)
        extra = _us_per_row(run_on, "server", args) - pred
        out["prediction"].append(pred)
        out["writer"].append(writer)
        out["server_extra"].append(extra)
        out["logged_row"].append(writer + extra)
    return out


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = [
        f"`{args.command}`: keep-alive clients from one asyncio process, {args.batch} row(s) per"
        f" request, {args.seconds:g} s measured after {args.warmup:g} s warm-up, {args.repeats} interleaved rounds;"
        f" {os.cpu_count()} cores ({platform.processor() or platform.machine()}), client and servers on the same"
        " cores; one worker and one torch thread per server. fsync of a 12 KiB write on the bench's disk:"
        f" p50 {args.fsync_ms['p50']:.2f} ms, p90 {args.fsync_ms['p90']:.2f} ms (before the rounds).",
    ]
    if args.note:
        lines += ["", f"Note: {args.note}"]
    lines += [
        "",
        "| clients | server | rows/s (mean ± std) | p50 ms | p99 ms | server CPU µs/row | its children's CPU µs/row"
        " | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows_per_s = {key: [r["requests_per_s"] * args.batch for r in runs] for key, runs in results.items()}
    for key, runs in results.items():
        clients, variant = key.split(" | ")
        lines.append(
            f"| {clients} | {variant} | {mean_std(rows_per_s[key], ',.0f')}"
            f" | {mean_std([r['p50_ms'] for r in runs], '.2f')} | {mean_std([r['p99_ms'] for r in runs], '.2f')}"
            f" | {mean_std([_us_per_row(r, 'server', args) for r in runs], '.0f')}"
            f" | {mean_std([_us_per_row(r, 'children', args) for r in runs], '.0f')}"
            f" | {sum(r['errors'] for r in runs)} |"
        )
    lines.append("")
    lines.append(
        "CPU is user + system time of the server process and of its children (kd-ops: the log writer; mlflow:"
        " its workers) over the measured window, per row answered in it; the client's is left out."
    )
    lines.append("")
    for clients in args.client_levels:
        mean = {
            v: statistics.fmean(rows_per_s[f"{clients} | {v}"]) for v in VARIANTS if f"{clients} | {v}" in rows_per_s
        }
        on, off = mean[VARIANTS[0]], mean[VARIANTS[1]]
        per_round = [
            1 - a / b
            for a, b in zip(rows_per_s[f"{clients} | {VARIANTS[0]}"], rows_per_s[f"{clients} | {VARIANTS[1]}"])
            if b
        ]
        line = (
            f"- {clients} clients: logging costs {1 - on / off:.1%} of throughput"
            f" (per round {mean_std(per_round, '.1%')}; target: at most 10%)"
        )
        if VARIANTS[2] in mean:
            ratio = on / mean[VARIANTS[2]]
            line += f"; kd-ops with logging serves {ratio:.2f}x the rows/s of `mlflow models serve` (target: 2x)"
        cpu = cpu_costs(results, clients, args)
        line += (
            f". CPU per logged row {mean_std(cpu['logged_row'], '.0f')} µs (writer {mean_std(cpu['writer'], '.0f')}"
            f" + server's extra {mean_std(cpu['server_extra'], '.0f')}) beside {mean_std(cpu['prediction'], '.0f')} µs"
            " per prediction (server, log off)"
        )
        lines.append(line)
    lines.append(f"- every row a log-on server answered is in its log: {args.log_complete}")
    return "\n".join(lines)


def fsync_ms(folder: Path, n: int = 200) -> dict[str, float]:
    """How long an fsync takes on the disk the logs are on: with synchronous=FULL it bounds the commit rate."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for i in range(n):
            os.pwrite(fd, b"x" * 12288, (i % 64) * 12288)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50": times[n // 2], "p90": times[int(n * 0.9)]}


def _rows_counted(url: str) -> float:
    """The server's own count of rows answered by /predict (`kd_ops_rows_total`)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kd_ops_rows_total" and s.labels == {"endpoint": "/predict", "status": "200"}
    )


def metrics_cost(args: argparse.Namespace, uri: str, name: str, version: str, rows: list, root: Path) -> dict:
    """`--metrics-cost`: both servers up, the load alternating between them in ABBA order (module docstring)."""
    extra = args.serve_args.split()
    servers = {VARIANTS[0]: Server(VARIANTS[0], uri, name, version, rows, root, extra)}
    try:
        servers[NO_METRICS] = Server(NO_METRICS, uri, name, version, rows, root, extra)
        runs: dict[str, list[dict]] = {f"{c} | {v}": [] for c in args.client_levels for v in servers}
        for rnd in range(args.repeats):
            for clients in args.client_levels:
                order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                for variant in order:
                    every = args.scrape_interval if variant == VARIANTS[0] else 0.0
                    out = asyncio.run(_load(servers[variant], clients, args.warmup, args.seconds, every))
                    runs[f"{clients} | {variant}"].append(out)
                    print(
                        f"round {rnd}: {clients:>3} clients {variant:<28} {out['requests_per_s'] * args.batch:>7,.0f}"
                        f" rows/s, p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, errors {out['errors']},"
                        f" CPU µs/row server {_us_per_row(out, 'server', args):.0f}, scrapes {out['scrapes']}",
                        file=sys.stderr,
                    )
        answered = sum(r["answered_requests"] for k, rs in runs.items() if k.endswith(VARIANTS[0]) for r in rs)
        counted = _rows_counted(servers[VARIANTS[0]].url)
    finally:
        for server in servers.values():
            server.stop()
    return {"runs": runs, "rows_counted": counted, "rows_answered": answered * args.batch}


def metrics_report(measured: dict, args: argparse.Namespace) -> str:
    runs = measured["runs"]
    lines = [
        METRICS_SECTION,
        "",
        f"`{args.command}`: two kd-ops servers with the log on (SQLite, synchronous=FULL), both up for the"
        f" whole run, one with metrics (its /metrics scraped every {args.scrape_interval:g} s during the"
        " load) and one with `--no-metrics`; the load alternates between them, ABBA order, each slice"
        f" {args.seconds:g} s measured after {args.warmup:g} s warm-up, {args.repeats} pairs;"
        f" {args.batch} row(s) per request; {os.cpu_count()} cores, client and servers on the same cores.",
    ]
    if args.note:
        lines += ["", f"Note: {args.note}"]
    lines += [
        "",
        "| clients | server | rows/s (mean ± std) | p50 ms | p99 ms | server CPU µs/row | writer CPU µs/row | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, rs in runs.items():
        clients, variant = key.split(" | ")
        shown = "kd-ops, log on, metrics on" if variant == VARIANTS[0] else variant
        lines.append(
            f"| {clients} | {shown} | {mean_std([r['requests_per_s'] * args.batch for r in rs], ',.0f')}"
            f" | {mean_std([r['p50_ms'] for r in rs], '.2f')} | {mean_std([r['p99_ms'] for r in rs], '.2f')}"
            f" | {mean_std([_us_per_row(r, 'server', args) for r in rs], '.0f')}"
            f" | {mean_std([_us_per_row(r, 'children', args) for r in rs], '.0f')}"
            f" | {sum(r['errors'] for r in rs)} |"
        )
    lines.append("")
    for clients in args.client_levels:
        on, off = runs[f"{clients} | {VARIANTS[0]}"], runs[f"{clients} | {NO_METRICS}"]
        rate = lambda rs: [r["requests_per_s"] for r in rs]  # noqa: E731
        cost = [1 - a / b for a, b in zip(rate(on), rate(off)) if b]
        cpu = [_us_per_row(a, "server", args) - _us_per_row(b, "server", args) for a, b in zip(on, off)]
        mean_cost = 1 - statistics.fmean(rate(on)) / statistics.fmean(rate(off))
        lines.append(
            f"- {clients} clients: metrics cost {mean_cost:.1%} of throughput (per pair"
            f" {mean_std(cost, '.1%')} over {len(cost)} pairs, median {statistics.median(cost):.1%}; target: at"
            " most 3%); server CPU per row"
            f" {statistics.fmean(cpu):+.1f} ± {statistics.stdev(cpu) if len(cpu) > 1 else 0:.1f} µs with metrics"
            f" ({statistics.fmean(cpu) / statistics.fmean([_us_per_row(b, 'server', args) for b in off]):+.1%})"
        )
    lines.append(
        f"- the metrics counted every answered row: {measured['rows_counted'] == measured['rows_answered']}"
        f" ({measured['rows_counted']:,.0f} counted, {measured['rows_answered']:,} answered)"
    )
    return "\n".join(lines)


def _kept(out: str) -> tuple[str, dict]:
    """The metrics section of `out`.md and key of `out`.json, if there are (a full run keeps them)."""
    md, js = Path(f"{out}.md"), Path(f"{out}.json")
    text = md.read_text() if md.exists() else ""
    section = text[text.index(METRICS_SECTION) :] if METRICS_SECTION in text else ""
    old = json.loads(js.read_text()) if js.exists() else {}
    return section, ({"metrics_cost": old["metrics_cost"]} if "metrics_cost" in old else {})


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
    parser.add_argument("--note", default="", help="a line for the .md, e.g. that the machine was shared")
    parser.add_argument(
        "--metrics-cost", action="store_true", help="only metrics on vs --no-metrics (log on), alternating; see above"
    )
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="--metrics-cost: seconds between scrapes")
    args = parser.parse_args()
    args.command = "python " + " ".join(shlex.quote(a) for a in ["bench/serve_load.py", *sys.argv[1:]])
    print(f"command: {args.command}", file=sys.stderr)

    from kd_ops.core.env import apply_offline_defaults

    apply_offline_defaults()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    variants = VARIANTS[:2] if args.skip_mlflow else VARIANTS
    with tempfile.TemporaryDirectory(prefix="kd-ops-serve-load-") as tmp:
        root = Path(tmp)
        args.fsync_ms = fsync_ms(root)
        print(f"fsync p50 {args.fsync_ms['p50']:.2f} ms, p90 {args.fsync_ms['p90']:.2f} ms", file=sys.stderr)
        print("distilling a digits student to serve ...", file=sys.stderr)
        uri, name, version, x = distil_student(root)
        rows = x[: args.batch].tolist()
        args.client_levels = [int(c) for c in str(args.clients).split(",")]
        if args.metrics_cost:
            measured = metrics_cost(args, uri, name, version, rows, root)
            text = metrics_report(measured, args)
            print(text)
            md, js = Path(f"{args.out}.md"), Path(f"{args.out}.json")
            before = md.read_text() if md.exists() else ""
            before = before[: before.index(METRICS_SECTION)] if METRICS_SECTION in before else before
            md.write_text((before.rstrip("\n") + "\n\n" if before.strip() else "") + text + "\n")
            payload = json.loads(js.read_text()) if js.exists() else {}
            payload["metrics_cost"] = {"args": vars(args), **measured}
            js.write_text(json.dumps(payload, indent=1, default=str))
            return
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
                    from kd_ops.prediction_log.reader import read_predictions

                    stored = len(read_predictions(server.store))
                    complete &= stored == out["answered_requests"] * args.batch
                    out["stored_rows"] = stored
                results[f"{clients} | {variant}"].append(out)
                print(
                    f"round {rnd}: {clients:>3} clients {variant:<20}"
                    f" {out['requests_per_s'] * args.batch:>7,.0f} rows/s,"
                    f" p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, errors {out['errors']},"
                    f" CPU µs/row server {_us_per_row(out, 'server', args):.0f}"
                    f" children {_us_per_row(out, 'children', args):.0f}",
                    file=sys.stderr,
                )
        args.log_complete = complete
    text = report(results, args)
    print(text)
    section, kept = _kept(args.out)
    save_results(
        args.out,
        text + ("\n\n" + section.rstrip("\n") if section else ""),
        {"args": vars(args), "results": results, **kept},
    )


if __name__ == "__main__":
    main()
