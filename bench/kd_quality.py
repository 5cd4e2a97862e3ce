"""Does distillation beat training on labels alone? Teacher, baseline and KD student, over seeds.

For each dataset and seed the teacher is trained once (full transfer set) and reused by URI for
the 10% regime, so both regimes distil from the same teacher. Prints a table and writes
`bench/results/kd_quality.json` and `.md`.

    python bench/kd_quality.py                      # digits and mnist5k, 5 seeds
    python bench/kd_quality.py --datasets digits --seeds 0 1 2 --set distill.jitter=0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from kd_ops.config.loading import load_config
from kd_ops.pipeline.distillation import run_distillation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ROLES = ("teacher", "baseline", "student")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1])
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--out", default=str(RESULTS / "kd_quality"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for name in args.datasets:
            for seed in args.seeds:
                teacher_uri = None
                for fraction in sorted(args.fractions, reverse=True):
                    sets = [
                        *args.set,
                        f"seed={seed}",
                        f"data.train_fraction={fraction}",
                        f"tracking.uri={uri}",
                        "train.progress_bar=false",
                        "evaluation.latency_repeats=50",
                    ]
                    if teacher_uri:
                        sets.append(f"teacher.uri={teacher_uri}")
                    cfg = load_config(ROOT / "examples" / f"{name}.yaml", sets)
                    t0 = time.perf_counter()
                    with contextlib.redirect_stdout(sys.stderr):
                        result = run_distillation(cfg)
                    teacher_uri = teacher_uri or _teacher_uri(result)
                    row = {
                        "dataset": name,
                        "seed": seed,
                        "train_fraction": fraction,
                        "wall_s": time.perf_counter() - t0,
                    }
                    for role in ROLES:
                        row[f"{role}_accuracy"] = result.metrics[role]["test_accuracy"]
                    row["student_train_s"] = result.metrics["student"]["train_time_s"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    summary = []
    for name in args.datasets:
        for fraction in sorted(args.fractions, reverse=True):
            sel = [r for r in rows if r["dataset"] == name and r["train_fraction"] == fraction]
            entry = {"dataset": name, "train_fraction": fraction, "seeds": len(sel)}
            for role in ROLES:
                entry[role] = mean_std([r[f"{role}_accuracy"] for r in sel])
            gap = entry["student"][0] - entry["baseline"][0]
            entry["kd_minus_baseline"] = gap
            entry["beats_by_more_than_stds"] = gap > entry["student"][1] + entry["baseline"][1]
            summary.append(entry)

    lines = [
        "| dataset | transfer set | seeds | teacher | baseline (labels only) | KD student | KD - baseline "
        "| > sum of stds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        cells = " | ".join(f"{e[r][0]:.4f} ± {e[r][1]:.4f}" for r in ROLES)
        lines.append(
            f"| {e['dataset']} | {e['train_fraction']:.0%} | {e['seeds']} | {cells} | "
            f"{e['kd_minus_baseline']:+.4f} | {'yes' if e['beats_by_more_than_stds'] else 'no'} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"overrides": args.set, "seeds": args.seeds}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2))
    out.with_suffix(".md").write_text(
        f"Test accuracy, mean ± std over seeds {args.seeds}; configs `examples/<dataset>.yaml`"
        f"{' with ' + ', '.join(args.set) if args.set else ''}.\n\n{table}\n"
    )


def _teacher_uri(result) -> str:
    from mlflow.tracking import MlflowClient

    from kd_ops.registry.tracking import TAG_TEACHER_URI

    return MlflowClient(result.tracking_uri).get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]


if __name__ == "__main__":
    main()
