"""How long does the monitor take: to judge a window (by window size), and to read its window from
a prediction log (by log size)?

Part `window` — for windows of 1k, 10k and 100k rows (noisy digits traffic drawn from the test
split, scored by a logistic-regression student fitted on the training split; the reference is the
validation split), times, in interleaved repeats after one warm-up:

  monitor      `monitors.monitor.judge`: the Evidently drift report (per-feature K-S, share,
               predicted-class and slice-share PSI, confidence K-S) + per-slice accuracy on
               labelled rows + the label-free estimates
  same metrics a bare `Report` with exactly the Evidently metrics the monitor asks for: the cost of
               kd-ops around Evidently
  preset       a bare `Report([DataDriftPreset()])` on the same columns: what a user would run by hand

Recording (HTML + JSON snapshot into MLflow and the workspace) is I/O and is timed apart.
Target: monitor / preset at most 1.2.

Part `log` — prediction logs of 10^4, 10^5 and 10^6 rows on SQLite and on a throw-away PostgreSQL
(`flows.processes.Postgres`), bulk-loaded in the writer's format (same tables, same orjson text):
requests of 10 rows, 80 % of them of the monitored model (version 1 in the first half of the log,
version 2 after), 20 % of another model; 30 % of the predictions labelled (a sixth of those
twice: the latest label counts), 20 % scored by the shadow teacher, spread over the whole log.
Times, in repeats interleaved over stores and sizes after one warm-up each:

  read         `read_predictions(store, model, last=1000)`, opening the store included (as every caller pays it)
  monitor run  `load_window(store, model, ..., rows=1000)` + `judge` (the same monitor as above)

Targets: the read of the latest 1,000 rows of a 10^6-row log under 1 s; a monitor run at 10^6
rows within 1.2x of the one at 10^4. Both parts write `bench/results/monitor_speed.json` and
`.md`; running one part keeps the other part's last figures.

    python bench/monitor_speed.py                  # both parts, ~10 minutes on 2 cores
    python bench/monitor_speed.py --part log       # the log sizes only
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from shared import RESULTS, mean_std, save_results  # bench/shared.py (bench/ is on sys.path when run)

MODEL, OTHER = "m", "other"
REQUEST_ROWS = 10


def _setup(dataset: str) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from kd_ops.config.training import DataConfig
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.evaluation.reference import Reference

    dm = DistillDataModule(DataConfig(name=dataset), seed=0)
    dm.setup()
    x_train, y_train = dm.arrays("train")
    student = LogisticRegression(max_iter=300).fit(x_train, y_train)
    x_ref, y_ref = dm.arrays("val")
    ref = Reference(
        x_ref.astype(np.float32),
        y_ref,
        student.predict_proba(x_ref).astype(np.float32),
        None,
        dm.input_slices().compute(x_ref),
    )
    return {"dm": dm, "student": student, "ref": ref, "x_ref": x_ref}


# -- part `window`: the monitor by window size ------------------------------------------------
def window_part(s: dict[str, Any], sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.presets import DataDriftPreset

    from kd_ops.config.monitoring import MonitorConfig
    from kd_ops.data.scenarios import sample
    from monitors.decision import judge
    from monitors.signals import _frame
    from monitors.window import Window

    dm, student, ref, x_ref = s["dm"], s["student"], s["ref"], s["x_ref"]
    features = [f"f{i}" for i in range(x_ref.shape[1])]
    definition = DataDefinition(
        numerical_columns=[*features, "confidence"], categorical_columns=["predicted", "slice_ink"]
    )
    p = MonitorConfig().drift_p_value
    same_metrics = [
        DriftedColumnsCount(columns=features, num_method="ks", num_threshold=p),
        ValueDrift(column="predicted", method="psi", threshold=0.1),
        ValueDrift(column="confidence", method="ks", threshold=p),
        ValueDrift(column="slice_ink", method="psi", threshold=0.1),
        *(ValueDrift(column=f, method="ks", threshold=p) for f in features),
    ]

    rows = []
    for n in sizes:
        x, y = sample(dm, "noise", n, seed=1)
        probs = student.predict_proba(x).astype(np.float32)
        window = Window("m", "1", x, probs, y.astype(float), np.full(n, np.nan), dm.input_slices().compute(x))
        current_df = _frame(x, probs, window.slices)
        ref_df = _frame(ref.x, ref.probabilities, ref.slices)

        def monitor():
            return judge(window, ref, MonitorConfig())

        def bare(metrics):
            def run():
                cur = Dataset.from_pandas(current_df, data_definition=definition)
                reference = Dataset.from_pandas(ref_df, data_definition=definition)
                return Report(metrics).run(cur, reference)

            return run

        timed = {"monitor": monitor, "same metrics": bare(same_metrics), "preset": bare([DataDriftPreset()])}
        for fn in timed.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in timed}
        for _ in range(repeats):
            for name, fn in timed.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        result = monitor()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            for kind, snapshot in result.snapshots.items():
                snapshot.save_html(os.path.join(tmp, f"{kind}.html"))
                snapshot.save_json(os.path.join(tmp, f"{kind}.json"))
            record_s = time.perf_counter() - t0
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"rows": n, **{f"{k}_s": v for k, v in med.items()}, "record_s": record_s})
        print(
            f"{n:>7} rows: monitor {med['monitor']:.2f} s, same metrics {med['same metrics']:.2f} s,"
            f" preset {med['preset']:.2f} s, recording {record_s:.2f} s",
            flush=True,
        )
    return rows


def window_lines(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The monitor by window size",
        "",
        f"`python bench/monitor_speed.py --part window` ({meta['dataset']}, {meta['features']} features, reference"
        f" {meta['reference_rows']} rows, median of {meta['repeats']} interleaved repeats after a warm-up,"
        f" {meta['cores']} cores{'; kept from an earlier run of this part' if meta.get('kept') else ''})",
        "",
        "| window rows | monitor s | bare report, same metrics s | bare DataDriftPreset s | monitor / same metrics"
        " | monitor / preset | recording (HTML + JSON) s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        own, same, preset = r["monitor_s"], r["same metrics_s"], r["preset_s"]
        lines.append(
            f"| {r['rows']:,} | {own:.2f} | {same:.2f} | {preset:.2f} | {own / same:.2f} | {own / preset:.2f}"
            f" | {r['record_s']:.2f} |"
        )
    worst = max(r["monitor_s"] / r["preset_s"] for r in rows)
    return [*lines, "", f"- worst monitor / preset ratio: {worst:.2f} (target: at most 1.2)"]


# -- part `log`: the window read by log size --------------------------------------------------
def build_log(url: str, n: int, pool: dict[str, Any], seed: int = 0) -> dict[str, int]:
    """A prediction log of `n` rows, bulk-loaded in the writer's format (see the module docstring).
    The JSON texts are the writer's own (`kd_ops.prediction_log._json` of float32 rows), encoded
    once per pool row; times go through the DateTime type's bind processor, as the writer's do."""
    from kd_ops.prediction_log.store import feedback, open_store, predictions, shadow

    rng = np.random.default_rng(seed)
    engine = open_store(url, sqlite_sync="OFF")
    dialect = engine.dialect
    stamp = predictions.c.created_at.type.dialect_impl(dialect).bind_processor(dialect) or (lambda v: v)
    requests = -(-n // REQUEST_ROWS)
    base = dt.datetime(2026, 1, 1)
    models = np.where(rng.random(requests) < 0.8, MODEL, OTHER)
    k = rng.integers(len(pool["inputs"]), size=n)
    pred_rows, times = [], []
    for r in range(requests):
        created = base + dt.timedelta(milliseconds=10 * r)
        version = "1" if r < requests // 2 else "2"
        request_id = os.urandom(16).hex()
        for i in range(r * REQUEST_ROWS, min(n, (r + 1) * REQUEST_ROWS)):
            j = k[i]
            pred_rows.append(
                (
                    os.urandom(16).hex(),
                    stamp(created),
                    str(models[r]),
                    version,
                    request_id,
                    i - r * REQUEST_ROWS,
                    pool["inputs"][j],
                    pool["probabilities"][j],
                    pool["predicted_class"][j],
                    pool["confidence"][j],
                    pool["slices"][j],
                )
            )
            times.append(created)
    labelled = np.flatnonzero(rng.random(n) < 0.3)
    twice = labelled[rng.random(len(labelled)) < 1 / 6]
    scored = np.flatnonzero(rng.random(n) < 0.2)
    late = dt.timedelta(seconds=5)
    fb_rows = [(pred_rows[i][0], int(rng.integers(10)), stamp(times[i] + late)) for i in labelled]
    fb_rows += [(pred_rows[i][0], int(rng.integers(10)), stamp(times[i] + 2 * late)) for i in twice]
    teacher = "models:/teacher/1"
    sh_rows = [
        (pred_rows[i][0], teacher, pool["probabilities"][k[i]], pool["predicted_class"][k[i]], stamp(times[i] + late))
        for i in scored
    ]
    tables = [
        (predictions, [c.key for c in predictions.columns], pred_rows),
        (feedback, ["prediction_id", "label", "received_at"], fb_rows),
        (shadow, ["prediction_id", "teacher_uri", "probabilities", "predicted_class", "created_at"], sh_rows),
    ]
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for table, cols, rows in tables:
            if dialect.name == "postgresql":
                import csv

                for i in range(0, len(rows), 50_000):
                    buf = io.StringIO()
                    csv.writer(buf).writerows(rows[i : i + 50_000])
                    buf.seek(0)
                    cur.copy_expert(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN WITH (FORMAT csv)", buf)
            else:
                marks = ", ".join("?" * len(cols))
                cur.executemany(f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({marks})", rows)
        if dialect.name == "postgresql":  # the statistics autovacuum gathers soon after a bulk load
            cur.execute("ANALYZE")
        raw.commit()
        cur.close()
    finally:
        raw.close()
        engine.dispose()
    return {"predictions": n, "feedback": len(fb_rows), "shadow": len(sh_rows)}


def _pool(s: dict[str, Any], size: int = 5000) -> dict[str, Any]:
    """Noisy digits traffic scored by the student, JSON-encoded once per row like the writer does."""
    from kd_ops.data.scenarios import sample
    from kd_ops.prediction_log.store import _json

    x, _ = sample(s["dm"], "noise", size, seed=1)
    x = np.asarray(x, dtype=np.float32)
    probs = s["student"].predict_proba(x).astype(np.float32)
    ink = s["dm"].input_slices().compute(x)["ink"]
    return {
        "inputs": [_json(row) for row in x],
        "probabilities": [_json(row) for row in probs],
        "predicted_class": [int(c) for c in probs.argmax(axis=1)],
        "confidence": [float(c) for c in probs.max(axis=1)],
        "slices": [_json({"ink": str(v)}) for v in ink],
    }


def log_part(s: dict[str, Any], sizes: list[int], stores: list[str], repeats: int, window: int) -> list[dict]:
    from kd_ops.config.monitoring import MonitorConfig
    from kd_ops.prediction_log.reader import read_predictions
    from monitors.decision import judge
    from monitors.window import load_window

    ref = s["ref"]
    pool = _pool(s)
    tmp = Path(tempfile.mkdtemp(prefix="kd-ops-monitor-speed-"))
    pg = None
    try:
        logs = []
        for store in stores:
            if store == "postgresql" and pg is None:
                from flows.processes import Postgres, server_bin

                pg = Postgres(server_bin())
            for n in sizes:
                url = pg.database() if store == "postgresql" else f"sqlite:///{tmp}/log-{n}.db"
                t0 = time.perf_counter()
                counts = build_log(url, n, pool)
                print(f"{store} {n:>9,} rows: built in {time.perf_counter() - t0:.1f} s {counts}", flush=True)
                logs.append({"store": store, "log_rows": n, "url": url, **{f"{k}_rows": v for k, v in counts.items()}})

        def read(url: str) -> Any:
            return read_predictions(url, model_name=MODEL, last=window)

        def monitor(url: str) -> Any:
            win = load_window(url, MODEL, ref.x.shape[1], ref.probabilities.shape[1], rows=window)
            return judge(win, ref, MonitorConfig())

        for entry in logs:  # warm-up, and what the window holds
            frame = read(entry["url"])
            result = monitor(entry["url"])
            entry.update(
                window_rows=len(frame),
                window_labelled=int(frame["label"].notna().sum()),
                window_shadow=int(frame["teacher_class"].notna().sum()),
                status=result.status,
                read_s=[],
                monitor_s=[],
            )
        for rep in range(repeats):
            for entry in logs:
                t0 = time.perf_counter()
                read(entry["url"])
                entry["read_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                monitor(entry["url"])
                entry["monitor_s"].append(time.perf_counter() - t0)
            print(f"repeat {rep + 1}/{repeats} done", flush=True)
        for entry in logs:
            entry.pop("url")
            print(
                f"{entry['store']:<10} {entry['log_rows']:>9,} rows: read {mean_std(entry['read_s'])} s,"
                f" monitor run {mean_std(entry['monitor_s'], '.2f')} s",
                flush=True,
            )
        return logs
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def log_lines(meta: dict[str, Any], logs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The window read by log size",
        "",
        f"`{meta['command']}` (latest {meta['window']:,} rows of model `{MODEL}`; mean ± std of {meta['repeats']}"
        f" repeats interleaved over stores and sizes after a warm-up each; {meta['cores']} cores"
        + (f"; {meta['note']}" if meta.get("note") else "")
        + ("; kept from an earlier run of this part" if meta.get("kept") else "")
        + ")",
        "",
        "| store | log rows | feedback rows | shadow rows | window: rows / labelled / shadow | read s (min)"
        " | monitor run s (min) | monitor run / smallest log (means) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for store in dict.fromkeys(e["store"] for e in logs):
        mine = [e for e in logs if e["store"] == store]
        first = statistics.fmean(mine[0]["monitor_s"])
        for e in mine:
            ratio = statistics.fmean(e["monitor_s"]) / first
            lines.append(
                f"| {store} | {e['log_rows']:,} | {e['feedback_rows']:,} | {e['shadow_rows']:,}"
                f" | {e['window_rows']:,} / {e['window_labelled']} / {e['window_shadow']}"
                f" | {mean_std(e['read_s'])} ({min(e['read_s']):.3f}) | {mean_std(e['monitor_s'], '.2f')}"
                f" ({min(e['monitor_s']):.2f}) | {ratio:.2f} |"
            )
        big = mine[-1]
        read_big = statistics.fmean(big["read_s"])
        ratio = statistics.fmean(big["monitor_s"]) / first
        verdicts.append(
            f"- {store}: read at {big['log_rows']:,} rows {read_big:.3f} s (target under 1 s:"
            f" {'met' if read_big < 1 else 'NOT met'}); monitor run {ratio:.2f}x the one at {mine[0]['log_rows']:,}"
            f" rows (target at most 1.2x: {'met' if ratio <= 1.2 else 'NOT met'})"
        )
    return [*lines, "", *verdicts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("window", "log", "both"), default="both")
    parser.add_argument("--sizes", default="1000,10000,100000", help="part window: window rows")
    parser.add_argument("--repeats", type=int, default=3, help="part window")
    parser.add_argument("--log-sizes", default="10000,100000,1000000", help="part log: rows in the log")
    parser.add_argument("--stores", default="sqlite,postgresql", help="part log")
    parser.add_argument("--log-repeats", type=int, default=5, help="part log")
    parser.add_argument("--window", type=int, default=1000, help="part log: window rows")
    parser.add_argument("--note", default="", help="a remark for the results (e.g. a shared machine)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--out", default=str(RESULTS / "monitor_speed"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    previous: dict[str, Any] = {}
    if Path(f"{args.out}.json").exists():
        previous = json.loads(Path(f"{args.out}.json").read_text())
    s = _setup(args.dataset)
    command = shlex.join(["python", "bench/monitor_speed.py", *sys.argv[1:]])
    base = {"dataset": args.dataset, "features": s["x_ref"].shape[1], "reference_rows": len(s["x_ref"])}
    base["cores"] = os.cpu_count()
    payload: dict[str, Any] = {"args": vars(args)}
    if args.part in ("window", "both"):
        meta = {**base, "repeats": args.repeats, "command": command}
        payload.update(window=meta, rows=window_part(s, [int(v) for v in args.sizes.split(",")], args.repeats))
    elif "rows" in previous:
        kept = previous.get("window", {**base, "repeats": previous["args"]["repeats"]})
        payload.update(window={**kept, "kept": True})
        payload["rows"] = previous["rows"]
    if args.part in ("log", "both"):
        meta = {**base, "repeats": args.log_repeats, "window": args.window, "command": command, "note": args.note}
        sizes, stores = [int(v) for v in args.log_sizes.split(",")], args.stores.split(",")
        payload.update(log=meta, log_sizes=log_part(s, sizes, stores, args.log_repeats, args.window))
    elif "log_sizes" in previous:
        payload.update(log={**previous["log"], "kept": True}, log_sizes=previous["log_sizes"])
    lines = ["# Monitor speed", ""]
    if "rows" in payload:
        lines += [*window_lines(payload["window"], payload["rows"]), ""]
    if "log_sizes" in payload:
        lines += log_lines(payload["log"], payload["log_sizes"])
    text = "\n".join(lines)
    print(text)
    save_results(args.out, text, payload)


if __name__ == "__main__":
    main()
