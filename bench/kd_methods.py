"""Every distillation method side by side: test accuracy and training time, over seeds.

For each dataset, seed and transfer-set size, one run trains the teacher, the labels-only
baseline and the KD student; every other method then reuses that teacher by URI (feature taps
included: a pt2 teacher is unflattened back to its module tree). Students train for a shorter,
fixed budget than `kd_quality.py` (`--min-steps`, `student.epochs=1`) so the whole grid fits in
about 50 minutes on 2 cores; the figures rank methods, they are not each method's best.

    python bench/kd_methods.py                          # digits and mnist5k, seeds 0-2, 100% and 10%
    python bench/kd_methods.py --datasets digits --seeds 0 --fractions 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

from kd_ops.config.loading import load_config
from kd_ops.pipeline.distillation import run_distillation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# name -> config overrides on top of examples/<dataset>.yaml. The MLP student taps `net.1` (its
# hidden layer after ReLU); the CNN teacher `net.head.2` (its penultimate layer after ReLU).
METHODS: dict[str, list[str]] = {
    "kd": ["distill.method=kd"],
    "dkd": ["distill.method=dkd", "distill.params={target_weight: 1.0, nontarget_weight: 8.0}"],
    "hint": ["distill.method=hint", "distill.params={student: net.1, teacher: net.head.2}"],
    "kd+hint": [
        "distill.method=kd",
        "distill.losses=[{name: hint, weight: 1.0, params: {student: net.1, teacher: net.head.2}}]",
    ],
    "attention+kd (cnn student)": [
        "distill.method=kd",
        "student.model=cnn",
        "student.params={channels: [8, 16], hidden: 32}",
        "distill.losses=[{name: attention, weight: 100.0, params: {pairs: [[net.features.2, net.features.2]]}}]",
    ],
    "kd (cnn student)": ["distill.method=kd", "student.model=cnn", "student.params={channels: [8, 16], hidden: 32}"],
    "rkd": ["distill.method=rkd", "distill.params={student: net.1, teacher: net.head.2}"],
    "pkt": ["distill.method=pkt", "distill.params={student: net.1, teacher: net.head.2}"],
    "crd": ["distill.method=crd", "distill.params={student: net.1, teacher: net.head.2, n_negatives: 1024}"],
    "multi-teacher (confidence)": [
        "distill.method=kd",
        "distill.combine=confidence",
        "teachers=[{model: mlp, params: {hidden: [256, 128]}, epochs: 30}]",
    ],
    "mutual (2 peers)": ["distill.method=mutual", "distill.params={peers: 2}"],
    "born_again (2 generations)": ["distill.method=born_again", "distill.params={generations: 2}"],
    "sklearn decision_tree": [
        "distill.method=sklearn",
        "distill.params={model: decision_tree, jitter_copies: 4, params: {max_depth: 12}}",
    ],
    "sklearn logistic_regression": [
        "distill.method=sklearn",
        "distill.params={model: logistic_regression, jitter_copies: 4}",
    ],
}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # NaN: not measured (the teacher's time in a reused-teacher run)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--min-steps", type=int, default=600)
    parser.add_argument("--out", default=str(RESULTS / "kd_methods"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (1 lets two benches share 2 cores)")
    parser.add_argument(
        "--resume",
        nargs="*",
        default=None,
        metavar="JSON",
        help="earlier results files: their finished (dataset, seed) cells are kept, not re-run",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    rows: list[dict] = []
    for path in args.resume or []:
        rows += json.loads(Path(path).read_text())["runs"]
    done = {(r["dataset"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"tracking.uri=sqlite:///{tmp}/bench.db",
            "train.progress_bar=false",
            "evaluation.latency_repeats=50",
            "student.epochs=1",
            f"student.min_steps={args.min_steps}",
            f"distill.cache.dir={tmp}/cache",
        ]
        for name in args.datasets:
            for seed in args.seeds:
                if (name, seed) in done:
                    continue
                teacher_uri = None
                for fraction in args.fractions:
                    base = [*common, f"seed={seed}", f"data.train_fraction={fraction}"]
                    # the reference run: teacher (trained once per seed), baseline and KD with their times
                    ref = _run(name, [*base, *([f"teacher.uri={teacher_uri}"] if teacher_uri else [])])
                    teacher_uri = teacher_uri or ref.runs_teacher_uri
                    for role in ("teacher", "baseline"):
                        rows.append(_row(name, seed, fraction, role, ref.metrics[role]))
                        print(json.dumps(rows[-1]), flush=True)
                    for method in args.methods:
                        sets = [*base, f"teacher.uri={teacher_uri}", "distill.baseline=false", *METHODS[method]]
                        result = ref if method == "kd" else _run(name, sets)
                        rows.append(_row(name, seed, fraction, method, result.metrics["student"]))
                        print(json.dumps(rows[-1]), flush=True)
                _report(rows, args)  # after every seed: a long run cut short still leaves figures
    _report(rows, args)


class _Ref:
    def __init__(self, result):
        from mlflow.tracking import MlflowClient

        from kd_ops.registry.tracking import TAG_TEACHER_URI

        self.metrics = result.metrics
        self.runs_teacher_uri = (
            MlflowClient(result.tracking_uri).get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]
        )


def _run(name: str, sets: list[str]) -> _Ref:
    cfg = load_config(ROOT / "examples" / f"{name}.yaml", sets)
    with contextlib.redirect_stdout(sys.stderr):
        return _Ref(run_distillation(cfg))


def _row(dataset: str, seed: int, fraction: float, method: str, metrics: dict) -> dict:
    return {
        "dataset": dataset,
        "seed": seed,
        "train_fraction": fraction,
        "method": method,
        "test_accuracy": metrics["test_accuracy"],
        "train_time_s": metrics.get("train_time_s", float("nan")),
        "param_count": metrics["param_count"],
    }


def _report(rows: list[dict], args) -> None:
    order = ["teacher", "baseline", *args.methods]
    lines = []
    for name in args.datasets:
        head = "| method | " + " | ".join(f"{f:.0%} accuracy | {f:.0%} train s" for f in args.fractions) + " | params |"
        lines += [f"\n**{name}** (seeds {args.seeds})\n", head, "| --- " * (2 * len(args.fractions) + 2) + "|"]
        for method in order:
            cells = []
            params = None
            for fraction in args.fractions:
                sel = [r for r in rows if (r["dataset"], r["method"], r["train_fraction"]) == (name, method, fraction)]
                if not sel:
                    cells += ["-", "-"]
                    continue
                acc = mean_std([r["test_accuracy"] for r in sel])
                secs = mean_std([r["train_time_s"] for r in sel])
                cells += [f"{acc[0]:.4f} ± {acc[1]:.4f}", f"{secs[0]:.1f}" if secs[0] == secs[0] else "-"]
                params = sel[0]["param_count"]
            lines.append(f"| {method} | " + " | ".join(cells) + (f" | {params:,.0f} |" if params else " | - |"))
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
    out.with_suffix(".md").write_text(
        f"Test accuracy (mean ± std over seeds) and student training seconds per method; students train "
        f"`student.min_steps={args.min_steps}` steps (teacher and baseline as in `examples/`). "
        f"The teacher row's time is not a student's.\n{table}\n"
    )


if __name__ == "__main__":
    main()
