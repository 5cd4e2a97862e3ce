"""Does a student close the gap to its teacher? Teacher, labels-only baselines, KD, function
matching and data-free students over labelled fractions and seeds.

For each dataset and seed the teacher is trained once (on the whole training split) and loaded by
URI for every other run, so all students distil from the same teacher. Per labelled fraction
(`data.labelled_fraction`: that share of the transfer set keeps its labels, the rest is
unlabelled and reaches the student only through the teacher), the arms are:

- `baseline`: labels only, no mixup; `baseline_mixup`: labels only with the example's mixup
  (images); the better of the two is the baseline that gap closed is measured against;
- `kd`: the shipped recipe (`examples/<dataset>.yaml` as it is);
- `fm`: the function-matching recipe (`distill.recipe: function_matching`'s values);
- `data_free`: images only, once per seed (it reads no training row, so no fraction applies).

Figures: test accuracy, fidelity (top-1 agreement with the teacher on the test split), gap closed
= (student - baseline) / (teacher - baseline), and training seconds. Each finished run is appended
to `<out>.jsonl`, so an interrupted study resumes where it stopped. Writes `<out>.json` and `.md`.

    python bench/kd_quality.py                                   # digits, mnist5k, churn, flights; 3 seeds
    python bench/kd_quality.py --datasets fashion-mnist --seeds 0 --fractions 0.01 0.1 1.0
    python bench/kd_quality.py --tables                          # churn and flights: MLP and tree students
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

from shared import mean_and_std, teacher_uri  # bench/shared.py (bench/ is on sys.path when run)

from kd_ops.config.loading import load_config
from kd_ops.pipeline.distillation import run_distillation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ROLES = ("teacher", "baseline", "student")
IMAGES = ("digits", "mnist5k", "fashion-mnist")
ARMS = ("baseline", "baseline_mixup", "kd", "fm", "data_free")


def _common_sets(args: argparse.Namespace, seed: int, fraction: float, uri: str) -> list[str]:
    return [
        *args.set,
        f"seed={seed}",
        f"data.train_fraction={fraction}",
        f"tracking.uri={uri}",
        "train.progress_bar=false",
        "evaluation.latency_repeats=50",
    ]


def _sets_of(recipe: dict) -> list[str]:
    return [f"{section}.{k}={v}" for section, keys in recipe.items() for k, v in keys.items()]


def _runs_for(name: str, fraction: float, fm_steps: int = 0) -> list[tuple[str, list[str], dict[str, str]]]:
    """(run key, overrides, {role in the run: arm}) for one dataset and labelled fraction."""
    from kd_ops.distill.recipes import function_matching

    image = name in IMAGES
    fm = function_matching(not image)
    if fm_steps:
        fm["student"] = {**fm["student"], "min_steps": fm_steps}
    runs = [("kd", [], {"baseline": "baseline_mixup" if image else "baseline", "student": "kd"})]
    if image:
        runs.append(("plain", ["distill.mixup=0"], {"baseline": "baseline"}))
    runs.append(("fm", [*_sets_of(fm), "distill.baseline=false"], {"student": "fm"}))
    if image and fraction == 1.0:
        free = ["distill.method=data_free", "distill.mixup=0", "distill.baseline=false"]
        runs.append(("data_free", free, {"student": "data_free"}))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k", "churn", "flights"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1, 0.05, 0.01])
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tables", action="store_true", help="the tabular benchmark: MLP and tree students")
    parser.add_argument("--flights-rows", type=int, default=60000, help="flights rows used (of 327,346)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the tables from <out>.jsonl")
    parser.add_argument("--fm-steps", type=int, default=0, help="function matching's steps (0: the recipe's)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.tables:
        args.fractions = [f for f in args.fractions if f in (1.0, 0.1)] or [1.0, 0.1]
        return tables(args)
    out = Path(args.out or RESULTS / "kd_quality")
    log_path = out.with_suffix(".jsonl")
    done = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    have = {(r["dataset"], r["seed"], r["labelled_fraction"], r["run"]) for r in done}
    if not args.summary_only:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/bench.db"
            for name in args.datasets:
                for seed in args.seeds:
                    teacher_uri = None
                    for fraction in sorted(args.fractions, reverse=True):
                        for key, extra, arms in _runs_for(name, fraction, args.fm_steps):
                            if (name, seed, fraction, key) in have | _logged(log_path):  # another process?
                                continue
                            row = _one_run(args, tmp, uri, name, seed, fraction, key, extra, arms, teacher_uri)
                            run_teacher = row.pop("teacher_uri")  # the run's own, never logged
                            teacher_uri = teacher_uri or run_teacher
                            done.append(row)
                            with log_path.open("a") as fh:
                                fh.write(json.dumps(row) + "\n")
                            print(json.dumps(row), flush=True)
    write_summary(done, args, out)


def _logged(log_path: Path) -> set[tuple]:
    """The runs in the log now: several processes may share one study (one dataset each)."""
    if not log_path.exists():
        return set()
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return {(r["dataset"], r["seed"], r["labelled_fraction"], r["run"]) for r in rows}


def _one_run(args, tmp, uri, name, seed, fraction, key, extra, arms, teacher) -> dict:
    sets = [
        *args.set,
        f"seed={seed}",
        f"data.labelled_fraction={fraction}",
        f"tracking.uri={uri}",
        f"distill.cache.dir={tmp}/cache",
        "train.progress_bar=false",
        "evaluation.latency_repeats=20",
        "evaluation.throughput_repeats=2",
        "evaluation.edge=[]",
        "gates={}",
        *extra,
    ]
    if name == "flights":
        sets.append(f"data.rows={args.flights_rows}")
    if teacher:
        sets.append(f"teacher.uri={teacher}")
    cfg = load_config(ROOT / "examples" / f"{name}.yaml", sets)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = run_distillation(cfg)
    row = {"dataset": name, "seed": seed, "labelled_fraction": fraction, "run": key, "wall_s": time.perf_counter() - t0}
    m = result.metrics
    row["teacher_accuracy"] = m["teacher"]["test_accuracy"]
    row["teacher_params"] = m["teacher"].get("param_count", float("nan"))
    for role, arm in arms.items():
        row[f"{arm}_accuracy"] = m[role]["test_accuracy"]
        row[f"{arm}_fidelity"] = m[role].get("agreement_with_teacher", float("nan"))
        row[f"{arm}_train_s"] = m[role].get("train_time_s", float("nan"))
        row[f"{arm}_params"] = m[role].get("param_count", float("nan"))
        if "test_roc_auc" in m[role]:
            row[f"{arm}_roc_auc"] = m[role]["test_roc_auc"]
    row["teacher_uri"] = teacher_uri(result)
    return row


MIN_GAP = 0.005  # a teacher less than half a point above the baseline leaves no gap to close


def _gap(student: float, baseline: float, teacher: float) -> float:
    """Gap closed; undefined (NaN, shown as "-") where the teacher is not `MIN_GAP` above the baseline."""
    return (student - baseline) / (teacher - baseline) if teacher - baseline >= MIN_GAP else float("nan")


def write_summary(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    """Per dataset and fraction: mean ± std over seeds of every arm, and gap closed per seed."""
    summary = []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for name in datasets:
        free = {r["seed"]: r for r in rows if r["dataset"] == name and r["run"] == "data_free"}
        for fraction in sorted({r["labelled_fraction"] for r in rows if r["dataset"] == name}, reverse=True):
            per_seed: dict[int, dict] = {}
            for r in rows:
                if r["dataset"] == name and r["labelled_fraction"] == fraction:
                    per_seed.setdefault(r["seed"], {}).update(r)
            for seed, r in per_seed.items():
                if seed in free:
                    r.update({k: v for k, v in free[seed].items() if k.startswith("data_free_")})
            entry: dict = {"dataset": name, "labelled_fraction": fraction, "seeds": sorted(per_seed)}
            bases = [a for a in ("baseline", "baseline_mixup") if all(f"{a}_accuracy" in r for r in per_seed.values())]
            best = max(bases, key=lambda a: statistics.fmean(r[f"{a}_accuracy"] for r in per_seed.values()))
            entry["best_baseline"] = best
            entry["teacher"] = mean_and_std([r["teacher_accuracy"] for r in per_seed.values()])
            entry["teacher_params"] = next(iter(per_seed.values())).get("teacher_params")
            for arm in ARMS:
                have = [r for r in per_seed.values() if f"{arm}_accuracy" in r]
                if not have:
                    continue
                entry[arm] = {
                    "accuracy": mean_and_std([r[f"{arm}_accuracy"] for r in have]),
                    "fidelity": mean_and_std([r[f"{arm}_fidelity"] for r in have]),
                    "train_s": mean_and_std([r[f"{arm}_train_s"] for r in have]),
                    "params": have[0].get(f"{arm}_params"),
                }
                if f"{arm}_roc_auc" in have[0]:
                    entry[arm]["roc_auc"] = mean_and_std([r[f"{arm}_roc_auc"] for r in have])
                if arm in ("kd", "fm", "data_free"):
                    entry[arm]["gap_closed"] = mean_and_std(
                        [_gap(r[f"{arm}_accuracy"], r[f"{best}_accuracy"], r["teacher_accuracy"]) for r in have]
                    )
                    entry[arm]["of_teacher"] = mean_and_std(
                        [r[f"{arm}_accuracy"] / r["teacher_accuracy"] for r in have]
                    )
            summary.append(entry)

    def cell(pair, digits=3):
        mean, std = pair
        return "-" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"

    def pct(pair):
        mean, std = pair
        return "-" if mean != mean else f"{100 * mean:.0f}% ± {100 * std:.0f}"

    lines = []
    for name in datasets:
        entries = [e for e in summary if e["dataset"] == name]
        seeds = sorted({s for e in entries for s in e["seeds"]})
        lines += [
            f"**{name}** (seeds {seeds}; teacher {entries[0]['teacher_params']:,.0f} parameters)",
            "",
            "| labelled | teacher | baseline (best of) | KD (shipped) | KD gap closed | KD fidelity | function "
            "matching | FM gap closed | FM fidelity | KD / FM train s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in entries:
            base = e[e["best_baseline"]]
            kd, fm = e.get("kd", {}), e.get("fm", {})
            nan = (float("nan"), float("nan"))
            base_kind = "mixup" if e["best_baseline"] == "baseline_mixup" else "plain"
            cells = [
                f"{e['labelled_fraction']:.0%}",
                cell(e["teacher"]),
                f"{cell(base['accuracy'])} ({base_kind})",
                cell(kd.get("accuracy", nan)),
                pct(kd.get("gap_closed", nan)),
                cell(kd.get("fidelity", nan)),
                cell(fm.get("accuracy", nan)),
                pct(fm.get("gap_closed", nan)),
                cell(fm.get("fidelity", nan)),
                f"{kd.get('train_s', nan)[0]:.0f} / {fm.get('train_s', nan)[0]:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        student_params = next((e["kd"]["params"] for e in entries if "kd" in e), float("nan"))
        lines += ["", f"Students: {student_params:,.0f} parameters."]
        free = next((e["data_free"] for e in entries if "data_free" in e), None)
        if free:
            seeds_free = sorted({r["seed"] for r in rows if r["dataset"] == name and r["run"] == "data_free"})
            lines.append(
                f"Data-free student (no training row read; seeds {seeds_free}): {cell(free['accuracy'])}, "
                f"{pct(free['of_teacher'])} of the teacher's accuracy, fidelity {cell(free['fidelity'])}, "
                f"{free['train_s'][0]:.0f} s."
            )
        lines.append("")
    table = "\n".join(lines)
    print(table)
    settings = {"overrides": args.set, "seeds": args.seeds, "fractions": args.fractions}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=1))
    out.with_suffix(".md").write_text(
        "Test split, mean ± std over seeds; configs `examples/<dataset>.yaml`, teacher trained once per seed "
        "and loaded by URI. `labelled`: the share of the transfer set that keeps labels (the rest is "
        "unlabelled, seen by students through the teacher only). Gap closed = (student - baseline) / "
        "(teacher - baseline) per seed, the baseline being the better labels-only student; it is '-' where the "
        "teacher is less than half a point above the baseline (there is no gap to close).\n\n" + table
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
                        teacher_uri = teacher_uri or teacher_uri(result)
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
                    entry[f"{role}_{metric}"] = mean_and_std([r[f"{role}_{metric}"] for r in sel])
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
    names = {
        "teacher": "teacher (LightGBM)",
        "baseline": "MLP, labels only",
        "student": "MLP, distilled",
        "tree_baseline": "tree, labels only",
        "tree": "tree, distilled",
    }
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


if __name__ == "__main__":
    main()
