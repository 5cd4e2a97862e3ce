"""How far does the prediction log go when many replicas write to it: SQLite vs PostgreSQL.

`--writers` processes (1, 4, 16: serving replicas) each open their own `PredictionLog` (its own
writer process, as `kd-ops serve` does) on the same store and log one-row predictions as fast as
their commits allow, `--in-flight` requests outstanding per replica, for `--seconds`. Reported:
committed rows per second over all writers (mean ± std over `--rounds` rounds), and the rows in
the store afterwards (every acknowledged row must be there).

  sqlite     one file in WAL mode with synchronous=FULL (the default store)
  postgres   a throw-away PostgreSQL cluster on 127.0.0.1 (Debian's binaries, `flows.processes.Postgres`),
             fsync on

Also: the teacher-output cache computed by 1 process and by 2 (`kd_ops.distill.distributed`, DDP over
gloo), for mnist5k's transfer rows and the CNN teacher of `examples/mnist5k.yaml`.

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
from shared import RESULTS, mean_std, save_results  # bench/shared.py (bench/ is on sys.path when run)


def _writer(url: str, seconds: float, in_flight: int, seed: int, out: mp.Queue) -> None:
    from kd_ops.prediction_log.client import PredictionLog
    from kd_ops.prediction_log.protocol import prediction_batch, prediction_rows
    from kd_ops.prediction_log.store import predictions

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


def cache_seconds(processes: int, rounds: int) -> list[float]:
    """Seconds to compute the teacher outputs of mnist5k's transfer set with 1 or 2 processes."""
    import torch
    import yaml
    from shared import ROOT

    from kd_ops.config.training import DataConfig, TeacherConfig, TrainConfig
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.distill.cache import compute_teacher_outputs
    from kd_ops.distill.distributed import distributed_teacher_outputs
    from kd_ops.pipeline.distillation import _new_model

    raw = yaml.safe_load((ROOT / "examples" / "mnist5k.yaml").read_text())
    dm = DistillDataModule(DataConfig(name="mnist5k"), 0)
    dm.setup()
    teacher = _new_model(TeacherConfig(**{k: raw["teacher"][k] for k in ("model", "params")}), dm, 0).eval()
    x = torch.as_tensor(dm.raw.x[dm.splits.transfer])
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        if processes == 1:
            compute_teacher_outputs(teacher, x)
        else:
            distributed_teacher_outputs(teacher, x, TrainConfig(devices=processes, strategy="ddp_spawn"))
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=8, help="outstanding one-row writes per replica")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "scale"))
    args = parser.parse_args()
    from flows.processes import Postgres, server_bin
    from kd_ops.prediction_log.reader import read_predictions

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
    cache = {n: cache_seconds(n, args.rounds) for n in (1, 2)}

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
        lines.append(
            f"| {n} | {mean_std(s['rows_per_s'], ',.0f')} | {mean_std(p['rows_per_s'], ',.0f')} | {complete} |"
        )
    lines += [
        "",
        f"Teacher-output cache of mnist5k's transfer set (CNN teacher of mnist5k.yaml), {args.rounds} rounds:",
        "",
        "| processes | seconds |",
        "| --- | --- |",
        *(f"| {n} | {mean_std(v, '.2f')} |" for n, v in cache.items()),
    ]
    text = "\n".join(lines)
    print(text)
    save_results(args.out, text, {"args": vars(args), "rows": rows, "cache_seconds": cache})


if __name__ == "__main__":
    main()
