"""Text distillation on Rotten Tomatoes: a transformer teacher trained in the run, or the
pretrained MiniLM sentence encoder with a head (`--teacher minilm`), into a bag of embeddings, a
small transformer and TF-IDF logistic regression, with labels-only students beside each.

For each seed and teacher kind the teacher is trained once and loaded by URI for every other
run. Per labelled fraction (`data.labelled_fraction`: the rest of
the training split is unlabelled and reaches the students only through the teacher) and per
student kind, one run gives the KD student and its labels-only baseline of the same kind and
budget. Figures on the test split: accuracy, macro F1, fidelity (top-1 agreement with the
teacher), p50 latency at batch 1 on one CPU thread, throughput, size, and the speedup over the
teacher, on encoded rows (what the metrics of every run report) and end to end from a raw string
(`raw_latency_ms_p50`: the registered model's `predict_proba` on a one-row DataFrame, tokenisation
included, which is what a caller waits for). Each finished run is appended to `<out>.jsonl`
(resumable); writes `<out>.json` / `.md`.

    python bench/kd_text.py                          # 3 seeds, 100% and 10% labelled
    python bench/kd_text.py --teacher minilm --students embedding_bag
    python bench/kd_text.py --seeds 0 --fractions 1.0 --set teacher.epochs=2   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from shared import RESULTS, ROOT, mean_and_std, teacher_uri  # bench/shared.py (bench/ is on sys.path when run)

from kd_ops.config.loading import load_config
from kd_ops.pipeline.distillation import run_distillation

CONFIG = ROOT / "examples" / "rotten-tomatoes.yaml"
METRICS = (
    "test_accuracy",
    "test_f1_macro",
    "agreement_with_teacher",
    "latency_ms_p50",
    "throughput_per_s",
    "model_size_bytes",
    "param_count",
    "train_time_s",
    "speedup",
)
ROLES = ("teacher_", "baseline_", "student_")
STUDENTS = {
    "embedding_bag": [],  # the example's student
    "transformer": ["student.model=transformer", "student.params={dim: 32, layers: 1, heads: 2, ff: 64}"],
    "tfidf_logreg": ["distill.method=sklearn", "distill.params={model: logistic_regression, params: {C: 10}}"],
}


TEACHERS = {
    "transformer": [],  # the example's teacher
    "minilm": ["teacher.model=pretrained_text", "teacher.params={}"],
}
RAW_LATENCY_ROWS = 200


def raw_latency_ms(uri: str, frame) -> float:
    """p50 milliseconds of the registered model at `uri` answering one raw record (one row of
    `frame`, tokenisation included), over the rows of `frame`, after a warm-up."""
    import numpy as np

    from kd_ops.models.loading import load_model

    model = load_model(uri)
    rows = [frame.iloc[[i]] for i in range(len(frame))]
    for row in rows[:10]:
        model.predict_proba(row)
    times = []
    for row in rows:
        t0 = time.perf_counter()
        model.predict_proba(row)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _one_run(args, tmp: str, seed: int, fraction: float, kind: str, teacher: str | None) -> tuple[dict, str]:
    sets = [
        *args.set,
        f"seed={seed}",
        f"data.labelled_fraction={fraction}",
        f"tracking.uri=sqlite:///{tmp}/bench.db",
        f"distill.cache.dir={tmp}/cache",
        "train.progress_bar=false",
        "evaluation.latency_repeats=200",
        "evaluation.throughput_repeats=3",
        "evaluation.edge=[]",
        "gates={}",
        *STUDENTS[kind],
    ]
    if teacher:
        sets.append(f"teacher.uri={teacher}")
    else:
        sets += TEACHERS[args.teacher]
    cfg = load_config(CONFIG, sets)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = run_distillation(cfg)
    row = {
        "seed": seed,
        "labelled_fraction": fraction,
        "student_kind": kind,
        "teacher_kind": args.teacher,
        "wall_s": time.perf_counter() - t0,
    }
    for role in ("teacher", "baseline", "student"):
        for metric in METRICS:
            row[f"{role}_{metric}"] = result.metrics[role].get(metric, float("nan"))
    teacher = teacher or teacher_uri(result)
    dm = result.datamodule
    frame = dm.schema.decode(dm.arrays("test")[0][:RAW_LATENCY_ROWS])
    row["student_raw_latency_ms_p50"] = raw_latency_ms(result.registered["model_uri"], frame)
    row["teacher_raw_latency_ms_p50"] = raw_latency_ms(teacher, frame)
    row["raw_speedup"] = row["teacher_raw_latency_ms_p50"] / row["student_raw_latency_ms_p50"]
    return row, teacher


def write_summary(rows: list[dict], out: Path) -> None:
    def cell(values: list[float], digits: int = 3) -> str:
        mean, std = mean_and_std(values)
        return "-" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        "| teacher | labelled | student | teacher acc | baseline acc | KD acc | KD - baseline | KD macro F1 "
        "| KD fidelity | KD / teacher acc | p50 ms (batch 1) | speedup | raw-string p50 ms | raw speedup "
        "| throughput /s | size KB | params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    groups = [
        (t, f, k)
        for t in TEACHERS
        for f in sorted({r["labelled_fraction"] for r in rows}, reverse=True)
        for k in STUDENTS
    ]
    for teacher, fraction, kind in groups:
        sel = [
            r
            for r in rows
            if r["labelled_fraction"] == fraction and r["student_kind"] == kind and r["teacher_kind"] == teacher
        ]
        if not sel:
            continue
        get = lambda key: [r[key] for r in sel]  # noqa: E731
        kd_mean, kd_std = mean_and_std(get("student_test_accuracy"))
        base_mean, base_std = mean_and_std(get("baseline_test_accuracy"))
        entry = {
            "teacher": teacher,
            "labelled_fraction": fraction,
            "student": kind,
            "seeds": sorted(r["seed"] for r in sel),
            **{
                k: mean_and_std(get(k))
                for k in sel[0]
                if (k.startswith(ROLES) or k == "raw_speedup") and k not in ("student_kind", "teacher_kind")
            },
            "kd_beats_baseline_by_more_than_stds": kd_mean - base_mean > kd_std + base_std,
        }
        summary.append(entry)
        lines.append(
            "| "
            + " | ".join(
                [
                    teacher,
                    f"{fraction:.0%}",
                    f"`{kind}`",
                    cell(get("teacher_test_accuracy")),
                    cell(get("baseline_test_accuracy")),
                    cell(get("student_test_accuracy")),
                    f"{kd_mean - base_mean:+.3f}",
                    cell(get("student_test_f1_macro")),
                    cell(get("student_agreement_with_teacher")),
                    cell([r["student_test_accuracy"] / r["teacher_test_accuracy"] for r in sel]),
                    cell(get("student_latency_ms_p50"), 4),
                    cell(get("student_speedup"), 1),
                    cell(get("student_raw_latency_ms_p50"), 3) if "raw_speedup" in sel[0] else "-",
                    cell(get("raw_speedup"), 1) if "raw_speedup" in sel[0] else "-",
                    f"{mean_and_std(get('student_throughput_per_s'))[0]:,.0f}",
                    f"{mean_and_std(get('student_model_size_bytes'))[0] / 1024:,.0f}",
                    f"{mean_and_std(get('student_param_count'))[0]:,.0f}",
                ]
            )
            + " |"
        )
    lines.append("")
    for teacher in TEACHERS:
        sel = [r for r in rows if r["teacher_kind"] == teacher]
        if sel:
            raw = [r.get("teacher_raw_latency_ms_p50", float("nan")) for r in sel]
            lines.append(
                f"Teacher `{teacher}`: {mean_and_std([r['teacher_param_count'] for r in sel])[0]:,.0f} parameters, "
                f"p50 {cell([r['teacher_latency_ms_p50'] for r in sel], 3)} ms at batch 1 on "
                f"encoded rows, {cell(raw, 3)} ms from a raw string; seeds {sorted({r['seed'] for r in sel})}."
            )
    lines.append("")
    table = "\n".join(lines)
    print(table)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=1, default=str))
    out.with_suffix(".md").write_text(
        "Rotten Tomatoes (fresh / rotten), test split, mean ± std over seeds; `examples/rotten-tomatoes.yaml`, "
        "the teacher trained once per seed and loaded by URI. `labelled`: the share of the training split "
        "that keeps labels (the rest is unlabelled, seen by students through the teacher only). Latency: "
        "batch 1, one torch thread: on encoded rows (`p50 ms`, `speedup`: tokenisation not included) and from a raw "
        "string through the registered model (`raw-string`: tokenisation included).\n\n" + table + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--teacher", default="transformer", choices=list(TEACHERS))
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--out", default=str(RESULTS / "kd_text"))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)  # latency on one CPU thread, as the target says
    out = Path(args.out)
    log = out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    for r in rows:  # rows written before the MiniLM arm
        r.setdefault("teacher_kind", "transformer")
    have = {(r["seed"], r["labelled_fraction"], r["student_kind"], r["teacher_kind"]) for r in rows}
    if not args.summary_only:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                teacher = None
                for fraction in sorted(args.fractions, reverse=True):
                    for kind in args.students:
                        if (seed, fraction, kind, args.teacher) in have:
                            continue
                        row, teacher = _one_run(args, tmp, seed, fraction, kind, teacher)
                        rows.append(row)
                        with log.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    write_summary(rows, out)


if __name__ == "__main__":
    main()
