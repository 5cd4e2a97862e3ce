"""How long does the monitor take to judge a window, next to a bare Evidently report on the same data?

For windows of 1k, 10k and 100k rows (noisy digits traffic drawn from the test split, scored by a
logistic-regression student fitted on the training split; the reference is the validation
split), times, in interleaved repeats after one warm-up:

  monitor      `monitors.monitor.judge`: the Evidently drift report (per-feature K-S, share,
               predicted-class and slice-share PSI, confidence K-S) + per-slice accuracy on
               labelled rows + the label-free estimates
  same metrics a bare `Report` with exactly the Evidently metrics the monitor asks for: the cost of
               kd-ops around Evidently
  preset       a bare `Report([DataDriftPreset()])` on the same columns: what a user would run by hand

Recording (HTML + JSON snapshot into MLflow and the workspace) is I/O and is timed apart.
Writes `bench/results/monitor_speed.json` and `.md`; target: monitor / preset at most 1.2.

    python bench/monitor_speed.py                  # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
from shared import RESULTS, save_results  # bench/shared.py (bench/ is on sys.path when run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--out", default=str(RESULTS / "monitor_speed"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.presets import DataDriftPreset
    from sklearn.linear_model import LogisticRegression

    from kd_ops.config import DataConfig, MonitorConfig
    from kd_ops.data import DistillDataModule
    from kd_ops.reference import Reference
    from kd_ops.scenarios import sample
    from monitors.monitor import _frame, judge
    from monitors.window import Window

    dm = DistillDataModule(DataConfig(name=args.dataset), seed=0)
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
    for n in [int(s) for s in args.sizes.split(",")]:
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
        for _ in range(args.repeats):
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
            f" preset {med['preset']:.2f} s, recording {record_s:.2f} s"
        )

    lines = [
        f"`python bench/monitor_speed.py` ({args.dataset}, {x_ref.shape[1]} features, reference {len(x_ref)} rows,"
        f" median of {args.repeats} interleaved repeats after a warm-up, {os.cpu_count()} cores)",
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
    lines += ["", f"- worst monitor / preset ratio: {worst:.2f} (target: at most 1.2)"]
    text = "\n".join(lines)
    print(text)
    save_results(args.out, text, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
