"""What do the edge exports of a student cost and buy? torch vs ONNX vs dynamic-int8 ONNX, over seeds.

For each dataset and seed, the example recipe (`examples/<dataset>.yaml`) distils a student with
`evaluation.edge: [onnx, onnx_int8]`; the student and both exports are scored by the same code
(`kd_ops.evaluation.metrics`, one CPU thread). Prints a table per dataset and writes
`bench/results/edge_exports.json` and `.md`. Accuracy is mean ± std over seeds; size, peak memory,
latency and throughput are medians over seeds.

    python bench/edge_exports.py                       # digits and mnist5k, 3 seeds (~2.5 minutes on 2 cores)
    python bench/edge_exports.py --datasets digits --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from kd_ops.config.loading import load_config
from kd_ops.pipeline.distillation import run_distillation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CANDIDATES = ("teacher", "student", "student-onnx", "student-onnx_int8")
COLUMNS = (
    ("model_size_bytes", "size (bytes)", "{:,.0f}"),
    ("peak_memory_bytes", "peak memory (bytes)", "{:,.0f}"),
    ("latency_ms_p50", "p50 ms", "{:.4f}"),
    ("latency_ms_p99", "p99 ms", "{:.4f}"),
    ("throughput_per_s_bs1", "rows/s @1", "{:,.0f}"),
    ("throughput_per_s_bs32", "rows/s @32", "{:,.0f}"),
    ("throughput_per_s_bs256", "rows/s @256", "{:,.0f}"),
)


def _accuracy(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def table(name: str, runs: list[dict[str, dict[str, float]]]) -> str:
    head = "| candidate | test accuracy | agreement with teacher | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"**{name}** ({len(runs)} seeds)", "", head, "|" + " --- |" * (3 + len(COLUMNS))]
    for cand in CANDIDATES:
        acc = _accuracy([r[cand]["test_accuracy"] for r in runs])
        agree = "-" if cand == "teacher" else _accuracy([r[cand]["agreement_with_teacher"] for r in runs])
        cells = [fmt.format(statistics.median(r[cand][key] for r in runs)) for key, _, fmt in COLUMNS]
        lines.append(f"| {cand} | {acc} | {agree} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(RESULTS / "edge_exports"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            for seed in args.seeds:
                sets = [
                    f"seed={seed}",
                    f"tracking.uri=sqlite:///{tmp}/bench.db",
                    "train.progress_bar=false",
                    "distill.baseline=false",
                    "evaluation.edge=[onnx, onnx_int8]",
                    "gates={}",
                ]
                with contextlib.redirect_stdout(sys.stderr):
                    out = run_distillation(load_config(ROOT / "examples" / f"{name}.yaml", sets))
                results.setdefault(name, []).append({c: out.metrics[c] for c in CANDIDATES})
                acc = {c: round(out.metrics[c]["test_accuracy"], 4) for c in CANDIDATES}
                print(f"{name} seed {seed}: {acc}", file=sys.stderr)

    machine = f"{platform.machine()}, os.cpu_count() {os.cpu_count()}, torch {torch.__version__}"
    text = "\n\n".join(table(name, runs) for name, runs in results.items())
    text += f"\n\nOne CPU thread for every candidate. Machine: {machine}.\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
