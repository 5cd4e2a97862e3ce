"""How far does the prediction log go when many replicas write to it: SQLite vs PostgreSQL.

`--writers` processes (1, 4, 16: serving replicas) each open their own `PredictionLog` (its own
writer process, as `kd-ops serve` does) on the same store and log one-row predictions as fast as
their commits allow, `--in-flight` requests outstanding per replica, for `--seconds`. Reported:
committed rows per second over all writers (mean ± std over `--rounds` rounds), and the rows in
the store afterwards (every acknowledged row must be there).

  sqlite     one file in WAL mode with synchronous=FULL (the default store)
  postgres   a throw-away PostgreSQL cluster on 127.0.0.1 (Debian's binaries, `flows.processes.Postgres`),
             fsync on

The teacher-output cache with 1 and 2 processes (distributed inference) is not measured yet: it
needs the DDP path of issue 8.

    python bench/scale.py                     # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from shared import RESULTS, save_results  # bench/shared.py (bench/ is on sys.path when run)


def _writer(url: str, seconds: float, in_flight: int, seed: int, out: mp.Queue) -> None:
    from kd_ops.prediction_log import PredictionLog, prediction_batch, prediction_rows, predictions

    rng = np.random.default_rng(seed)
    x = rng.random((1, 64), dtype=np.float32)
    probs = np.full((1, 10), 0.1, dtype=np.float32)
    try:
        log = PredictionLog.open_sync(url)
    except Exception as exc:  # reported, not a silent hang of the parent
        out.put(exc)
        return
    acked, pending = 0, set()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        while len(pending) < in_flight:
            pending.add(log.submit(predictions, prediction_rows(prediction_batch("m", "1", x, probs, [{}]))))
        done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        acked += sum(1 for f in done if f.exception() is None)
    for f in concurrent.futures.as_completed(pending, timeout=60):
        acked += f.exception() is None
    log.close()
    out.put(acked)


def measure(url: str, writers: int, seconds: float, in_flight: int) -> tuple[float, int]:
    """Committed rows per second over `writers` processes; and how many rows were acknowledged."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, seconds, in_flight, i, out)) for i in range(writers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 180) for _ in procs]
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {writers} writers failed to open {url}: {errors[0]}")
    acked = sum(results)
    for p in procs:
        p.join(60)
    return acked / seconds, acked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=8, help="outstanding one-row writes per replica")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "scale"))
    args = parser.parse_args()
    from flows.processes import Postgres, server_bin
    from kd_ops.prediction_log import read_predictions

    bin_dir = server_bin()
    if bin_dir is None:
        sys.exit("PostgreSQL's server binaries are missing (apt-get install postgresql)")
    writers = [int(w) for w in args.writers.split(",")]
    pg = Postgres(bin_dir)
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kd-ops-scale-") as tmp:
            for n in writers:
                for store in ("sqlite", "postgres"):
                    rates, complete = [], True
                    for r in range(args.rounds):
                        url = f"sqlite:///{tmp}/{n}-{r}.db" if store == "sqlite" else pg.database()
                        rate, acked = measure(url, n, args.seconds, args.in_flight)
                        complete &= len(read_predictions(url)) == acked
                        rates.append(rate)
                    row = {"store": store, "writers": n, "rows_per_s": rates, "complete": complete}
                    rows.append(row)
                    print(f"{store:>8} {n:>2} writers: {statistics.fmean(rates):8.0f} rows/s", file=sys.stderr)
    finally:
        pg.stop()

    def ms(v: list[float]) -> str:
        return f"{statistics.fmean(v):,.0f} ± {statistics.stdev(v) if len(v) > 1 else 0:,.0f}"

    lines = [
        f"`python bench/scale.py` (one-row writes, {args.in_flight} in flight per writer process,"
        f" {args.seconds:g} s per round, {args.rounds} rounds, {os.cpu_count()} cores shared by writers and database)",
        "",
        "| writers | SQLite rows/s | PostgreSQL rows/s | every acknowledged row stored |",
        "| --- | --- | --- | --- |",
    ]
    for n in writers:
        s = next(r for r in rows if r["writers"] == n and r["store"] == "sqlite")
        p = next(r for r in rows if r["writers"] == n and r["store"] == "postgres")
        complete = "yes" if s["complete"] and p["complete"] else "NO"
        lines.append(f"| {n} | {ms(s['rows_per_s'])} | {ms(p['rows_per_s'])} | {complete} |")
    text = "\n".join(lines)
    print(text)
    save_results(args.out, text, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
