"""Does distillation beat training on labels alone? Teacher, baseline and KD student, over seeds.

For each dataset and seed the teacher is trained once (full transfer set) and reused by URI for
the 10% regime, so both regimes distil from the same teacher. Prints a table and writes
`bench/results/kd_quality.json` and `.md`.

    python bench/kd_quality.py                      # digits and mnist5k, 5 seeds
    python bench/kd_quality.py --datasets digits --seeds 0 1 2 --set distill.jitter=0
    python bench/kd_quality.py --tables             # churn and flights: boosted teacher -> MLP and -> tree

With `--tables`, each table (`examples/<dataset>.yaml`: a LightGBM teacher, an MLP student) is also
distilled into a decision tree from the same teacher (by URI), and the figures are accuracy, ROC
AUC, p50 latency at batch 1 (one thread) and size; results go to `kd_quality_tables.json`/`.md`.
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


def _common_sets(args: argparse.Namespace, seed: int, fraction: float, uri: str) -> list[str]:
    return [
        *args.set,
        f"seed={seed}",
        f"data.train_fraction={fraction}",
        f"tracking.uri={uri}",
        "train.progress_bar=false",
        "evaluation.latency_repeats=50",
    ]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1])
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tables", action="store_true", help="the tabular benchmark (churn, flights)")
    parser.add_argument("--flights-rows", type=int, default=60000, help="flights rows used (of 327,346)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.tables:
        return tables(args)
    args.out = args.out or str(RESULTS / "kd_quality")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for name in args.datasets:
            for seed in args.seeds:
                teacher_uri = None
                for fraction in sorted(args.fractions, reverse=True):
                    sets = _common_sets(args, seed, fraction, uri)
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


TREE = "distill.params={model: decision_tree, params: {max_depth: 8, min_samples_leaf: 5}}"
TABLE_ROLES = ("teacher", "baseline", "student", "tree_baseline", "tree")
TABLE_METRICS = ("test_accuracy", "test_roc_auc", "latency_ms_p50", "model_size_bytes")


def tables(args: argparse.Namespace) -> None:
    """Boosted teacher -> MLP (labels-only baseline beside it) and -> decision tree (likewise)."""
    datasets = [d for d in args.datasets if d in ("churn", "flights")] or ["churn", "flights"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for name in datasets:
            for seed in args.seeds:
                teacher_uri = None
                for fraction in sorted(args.fractions, reverse=True):
                    sets = [*_common_sets(args, seed, fraction, uri), f"distill.cache.dir={tmp}/cache"]
                    if name == "flights":
                        sets.append(f"data.rows={args.flights_rows}")
                    row: dict = {"dataset": name, "seed": seed, "train_fraction": fraction}
                    t0 = time.perf_counter()
                    for kind, extra in (("mlp", []), ("tree", ["distill.method=sklearn", TREE])):
                        run_sets = sets + extra + ([f"teacher.uri={teacher_uri}"] if teacher_uri else [])
                        cfg = load_config(ROOT / "examples" / f"{name}.yaml", run_sets)
                        with contextlib.redirect_stdout(sys.stderr):
                            result = run_distillation(cfg)
                        teacher_uri = teacher_uri or _teacher_uri(result)
                        roles = ("teacher", "baseline", "student") if kind == "mlp" else ("baseline", "student")
                        for role in roles:
                            out = role if kind == "mlp" else {"baseline": "tree_baseline", "student": "tree"}[role]
                            for metric in TABLE_METRICS:
                                row[f"{out}_{metric}"] = result.metrics[role].get(metric, float("nan"))
                    row["wall_s"] = time.perf_counter() - t0
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    summary = []
    for name in datasets:
        for fraction in sorted(args.fractions, reverse=True):
            sel = [r for r in rows if r["dataset"] == name and r["train_fraction"] == fraction]
            entry: dict = {"dataset": name, "train_fraction": fraction, "seeds": len(sel)}
            for role in TABLE_ROLES:
                for metric in TABLE_METRICS:
                    entry[f"{role}_{metric}"] = mean_std([r[f"{role}_{metric}"] for r in sel])
            for student, base in (("student", "baseline"), ("tree", "tree_baseline")):
                (s_mean, s_std), (b_mean, b_std) = entry[f"{student}_test_accuracy"], entry[f"{base}_test_accuracy"]
                entry[f"{student}_minus_{base}"] = s_mean - b_mean
                entry[f"{student}_beats_by_more_than_stds"] = s_mean - b_mean > s_std + b_std
            summary.append(entry)

    def cell(e: dict, key: str, digits: int = 4) -> str:
        mean, std = e[key]
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        "| dataset | transfer set | role | accuracy | ROC AUC | p50 latency (ms) | size (bytes) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"teacher": "teacher (LightGBM)", "baseline": "MLP, labels only", "student": "MLP, distilled",
             "tree_baseline": "tree, labels only", "tree": "tree, distilled"}
    for e in summary:
        for role in TABLE_ROLES:
            lines.append(
                f"| {e['dataset']} | {e['train_fraction']:.0%} | {names[role]} | {cell(e, f'{role}_test_accuracy')} | "
                f"{cell(e, f'{role}_test_roc_auc')} | {cell(e, f'{role}_latency_ms_p50', 3)} | "
                f"{e[f'{role}_model_size_bytes'][0]:,.0f} |"
            )
    verdicts = [
        f"- {e['dataset']}, {e['train_fraction']:.0%}: MLP distilled - labels only {e['student_minus_baseline']:+.4f} "
        f"({'more' if e['student_beats_by_more_than_stds'] else 'not more'} than the sum of stds); tree "
        f"{e['tree_minus_tree_baseline']:+.4f} ({'more' if e['tree_beats_by_more_than_stds'] else 'not more'})"
        for e in summary
    ]
    table = "\n".join(lines)
    print(table)
    print("\n".join(verdicts))
    out = Path(args.out or RESULTS / "kd_quality_tables")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"overrides": args.set, "seeds": args.seeds, "flights_rows": args.flights_rows}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2))
    out.with_suffix(".md").write_text(
        f"Test split, mean ± std over seeds {args.seeds}; configs `examples/<dataset>.yaml` (flights: "
        f"{args.flights_rows:,} rows sampled, split by time), the tree `{TREE}` distilled from the same "
        f"teacher by URI.\n\n{table}\n\n" + "\n".join(verdicts) + "\n"
    )


def _teacher_uri(result) -> str:
    from mlflow.tracking import MlflowClient

    from kd_ops.registry.tracking import TAG_TEACHER_URI

    return MlflowClient(result.tracking_uri).get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]


if __name__ == "__main__":
    main()
