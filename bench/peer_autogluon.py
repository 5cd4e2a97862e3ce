"""kd-ops' table students beside AutoGluon 1.6's `TabularPredictor.distill`, on the same rows.

Why this exists: kd-ops distils a boosted teacher into one small model (an MLP with category
embeddings, or a decision tree); AutoGluon's `distill()` does the same after its own AutoML fit.
The question is whether kd-ops' student is as accurate as AutoGluon's best distilled student at
equal or lower batch-1 latency.

Per dataset (churn, flights) and seed (0, 1, 2):

1. kd-ops: `examples/<dataset>.yaml` (flights: `data.rows` sampled rows, split by time) through
   `run_distillation`: LightGBM teacher, labels-only MLP, distilled MLP. Then the tree student
   (`distill.method=sklearn`, a depth-8 decision tree) from the same teacher, loaded by URI.
2. The raw (un-encoded) train, val and test rows of that run's splits, with the label, go to
   Parquet files: AutoGluon sees exactly the rows kd-ops saw, not a re-split.
3. `bench/peers/autogluon_worker.py` runs in bench/.venv-autogluon (AutoGluon pins its own
   numpy/scikit-learn/LightGBM): fit (medium_quality, `--time-limit`), distill (`--distill-limit`,
   soft teacher predictions), every distilled model measured on the test split. It prints JSON.

Every process runs on one thread (torch here, OMP_NUM_THREADS=1 and num_cpus=1 there) and at
the niceness this script was started with: it shares a small machine with other benchmarks.
Writes bench/results/peers_autogluon.{json,md}; the JSON is rewritten after each seed, so
`--resume` picks up an interrupted study.

    nice -n 5 .venv/bin/python bench/peer_autogluon.py
    nice -n 5 .venv/bin/python bench/peer_autogluon.py --datasets churn --seeds 0 --time-limit 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKER = ROOT / "bench" / "peers" / "autogluon_worker.py"
AG_PYTHON = ROOT / "bench" / ".venv-autogluon" / "bin" / "python"
TREE = "distill.params={model: decision_tree, params: {max_depth: 8, min_samples_leaf: 5}}"
METRICS = ("test_accuracy", "test_roc_auc", "latency_ms_p50", "model_size_bytes", "train_time_s")
LATENCY_REPEATS = 200
VERDICT = "<!-- verdict: written by hand from the figures above; kept when this file is rebuilt -->"


def kd_run(name: str, seed: int, tmp: Path, flights_rows: int, extra: list[str]):
    from kd_ops.config.loading import load_config
    from kd_ops.pipeline.distillation import run_distillation

    sets = [
        f"seed={seed}",
        f"tracking.uri=sqlite:///{tmp}/bench.db",
        f"distill.cache.dir={tmp}/cache",
        "train.progress_bar=false",
        "evaluation.edge=[]",
        f"evaluation.latency_repeats={LATENCY_REPEATS}",
        "gates={}",
        *extra,
    ]
    if name == "flights":
        sets.append(f"data.rows={flights_rows}")
    cfg = load_config(ROOT / "examples" / f"{name}.yaml", sets)
    with contextlib.redirect_stdout(sys.stderr):
        return cfg, run_distillation(cfg)


def teacher_run(result):
    from mlflow.tracking import MlflowClient

    return MlflowClient(result.tracking_uri).get_run(result.runs["teacher"])


def export_splits(cfg, result, folder: Path) -> dict:
    """The user's rows of each split (features as given, the label as the user's classes) to Parquet.

    `dm.table.frame` holds the feature columns of the (sampled, `until`-cut) frame kd-ops split,
    `dm.table.y` the class index of each row into `schema.classes` (sorted: index 1 is True / 'Yes',
    the class kd-ops' ROC AUC scores as positive)."""
    import numpy as np
    import pandas as pd

    dm = result.datamodule
    table = dm.table
    label = cfg.data.label or {"churn": "churn", "flights": "late"}[cfg.data.name]
    classes = list(table.schema.classes)
    labels = pd.Series(np.asarray(classes, dtype=object)[table.y], name=label).infer_objects()
    frame = table.frame.reset_index(drop=True).assign(**{label: labels})
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for part in ("train", "val", "test"):
        idx = getattr(dm.splits, part)
        frame.iloc[idx].reset_index(drop=True).to_parquet(folder / f"{part}.parquet")
        rows[part] = len(idx)
    positive = classes[1]
    (folder / "meta.json").write_text(json.dumps({"label": label, "positive": positive, "classes": classes}))
    return {"label": label, "positive": positive, "rows": rows, "features": list(table.frame.columns)}


def run_worker(folder: Path, seed: int, time_limit: float, distill_limit: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [str(AG_PYTHON), str(WORKER), str(folder), str(seed), str(time_limit), str(distill_limit)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)  # stderr: our log
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_seed(args: argparse.Namespace, name: str, seed: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    cfg, mlp = kd_run(name, seed, tmp, args.flights_rows, [])
    row: dict = {"dataset": name, "seed": seed}
    for role, out in (("teacher", "kd_teacher"), ("baseline", "kd_mlp_labels_only"), ("student", "kd_mlp")):
        row[out] = {k: mlp.metrics[role].get(k, float("nan")) for k in METRICS}
    teacher = teacher_run(mlp)  # the teacher's training seconds are in its run, not in result.metrics
    row["kd_teacher"]["train_time_s"] = teacher.data.metrics.get("train_time_s", float("nan"))
    folder = tmp / f"{name}-{seed}"
    row["export"] = export_splits(cfg, mlp, folder)
    tree_sets = ["distill.method=sklearn", TREE, f"teacher.uri={teacher.data.tags['kd_ops.teacher_model_uri']}"]
    _, tree = kd_run(name, seed, tmp, args.flights_rows, tree_sets)
    row["kd_tree"] = {k: tree.metrics["student"].get(k, float("nan")) for k in METRICS}
    row["kd_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    row["autogluon"] = run_worker(folder, seed, args.time_limit, args.distill_limit)
    row["autogluon_wall_s"] = time.perf_counter() - t0
    return row


# -- summary --------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> list[float] | None:
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return None
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def flat(m: dict) -> dict:
    """One model's figures under shared names (AutoGluon's fit_time_s is the 'train_time_s')."""
    return {
        "test_accuracy": m.get("test_accuracy"),
        "test_roc_auc": m.get("test_roc_auc"),
        "latency_ms_p50": m.get("latency_ms_p50"),
        "model_size_bytes": m.get("model_size_bytes"),
        "train_time_s": m.get("train_time_s", m.get("fit_time_s")),
        "model_call_ms_p50": m.get("model_call_ms_p50"),
    }


def entries_of(row: dict) -> dict[str, dict]:
    """Table row name -> figures, for one dataset and seed."""
    ag = row["autogluon"]
    out = {
        "kd-ops teacher (LightGBM)": flat(row["kd_teacher"]),
        "kd-ops MLP student": flat(row["kd_mlp"]),
        "kd-ops tree student": flat(row["kd_tree"]),
        "AutoGluon teacher (best model)": {**flat(ag["teacher"]), "train_time_s": ag["fit_s"]},
    }
    if ag.get("best_distilled"):
        out["AutoGluon best distilled student"] = flat(ag["distilled"][ag["best_distilled"]])
    for name, m in ag["distilled"].items():
        out[f"AutoGluon {name}"] = flat(m)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    summary = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        sel = [r for r in rows if r["dataset"] == name]
        per = [entries_of(r) for r in sel]
        names = list(dict.fromkeys(k for e in per for k in e))
        entry: dict = {"dataset": name, "seeds": [r["seed"] for r in sel], "rows": sel[0]["export"]["rows"]}
        entry["autogluon_teachers"] = [r["autogluon"]["teacher_name"] for r in sel]
        entry["autogluon_best_distilled"] = [r["autogluon"]["best_distilled"] for r in sel]
        entry["autogluon_distill_s"] = mean_std([r["autogluon"]["distill_s"] for r in sel])
        entry["autogluon_feature_pipeline_ms_p50"] = mean_std([r["autogluon"]["feature_pipeline_ms_p50"] for r in sel])
        entry["models"] = {}
        for model in names:
            have = [e[model] for e in per if model in e]
            entry["models"][model] = {"n_seeds": len(have), **{k: mean_std([h[k] for h in have]) for k in have[0]}}
        summary.append(entry)
    return summary


def cell(pair: list[float] | None, digits: int) -> str:
    return "-" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def size_cell(pair: list[float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:,.0f} ± {pair[1]:,.0f}"


def tables(summary: list[dict]) -> str:
    lines = []
    for e in summary:
        lines += [
            f"### {e['dataset']} (seeds {e['seeds']}; rows train/val/test {e['rows']['train']:,} / "
            f"{e['rows']['val']:,} / {e['rows']['test']:,})",
            "",
            "| model | seeds | test accuracy | ROC AUC | p50 batch-1 latency (ms) | AutoGluon model call alone (ms) "
            "| size (bytes) | train / distil s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for model, m in e["models"].items():
            lines.append(
                f"| {model} | {m['n_seeds']} | {cell(m['test_accuracy'], 4)} | {cell(m['test_roc_auc'], 4)} | "
                f"{cell(m['latency_ms_p50'], 3)} | {cell(m['model_call_ms_p50'], 3)} | "
                f"{size_cell(m['model_size_bytes'])} | {cell(m['train_time_s'], 1)} |"
            )
        lines += [
            "",
            f"AutoGluon teacher per seed: {', '.join(e['autogluon_teachers'])}; best distilled student (by "
            f"validation accuracy) per seed: {', '.join(str(b) for b in e['autogluon_best_distilled'])}. "
            f"Whole `distill()` call: {cell(e['autogluon_distill_s'], 1)} s. AutoGluon's feature pipeline alone "
            f"(`transform_features` on one row): {cell(e['autogluon_feature_pipeline_ms_p50'], 3)} ms p50.",
            "",
        ]
    return "\n".join(lines)


def verdicts(summary: list[dict]) -> list[str]:
    """Per dataset: each kd-ops student against AutoGluon's best distilled student, accuracy and latency."""
    out = []
    for e in summary:
        ag = e["models"].get("AutoGluon best distilled student")
        if ag is None:
            continue
        for student in ("kd-ops MLP student", "kd-ops tree student"):
            kd = e["models"][student]
            d_acc = kd["test_accuracy"][0] - ag["test_accuracy"][0]
            noise = kd["test_accuracy"][1] + ag["test_accuracy"][1]
            faster = kd["latency_ms_p50"][0] <= ag["latency_ms_p50"][0]
            ahead = "ahead" if d_acc > noise else ("behind" if d_acc < -noise else "level (within the sum of stds)")
            out.append(
                f"- {e['dataset']}: {student} {d_acc:+.4f} accuracy against AutoGluon's best distilled student: "
                f"{ahead}; batch-1 p50 {kd['latency_ms_p50'][0]:.3f} ms against {ag['latency_ms_p50'][0]:.3f} ms "
                f"({'equal or lower' if faster else 'higher'})."
            )
    return out


def header(settings: dict) -> str:
    """What was run, stated once, above the tables."""
    return f"""# kd-ops table students against AutoGluon {settings.get("autogluon_version", "1.6")} `distill()`

Test split, mean ± std over seeds {settings["seeds"]}; the same rows for both tools (kd-ops' splits exported as
Parquet, raw columns).

- **Data.** churn: 7,043 rows, split stratified at random per seed, 65% train / 15% val / 20% test. flights:
  {settings["flights_rows"]:,} of the 327,346 flights sampled (fixed sample), cut to January-March 2013
  (`data.until` of `examples/flights.yaml`), split by time (earliest 65% train, next 15% val, latest 20% test:
  the same rows for every seed).
- **kd-ops.** `examples/<dataset>.yaml` with `seed`, `evaluation.edge=[]`, `evaluation.latency_repeats=
  {settings["latency_repeats"]}`, `gates={{}}`: LightGBM teacher, MLP student (KD, T=2, 0.7 KD / 0.3 CE); the
  tree student is `distill.method=sklearn`, `{settings["tree"]}`, distilled from the same teacher (by URI). torch on
  one thread.
- **AutoGluon.** `TabularPredictor(eval_metric='accuracy').fit(train, tuning_data=val, presets='medium_quality',
  time_limit={settings["autogluon_fit_time_limit_s"]:.0f}, num_cpus=1, ag_args_fit={{'num_cpus': 1}})` with the seed
  written into each model's own seed hyperparameter ('default' hyperparameters, as medium_quality uses); then
  `distill(time_limit={settings["autogluon_distill_time_limit_s"]:.0f}, teacher_preds='soft')` with its default
  students GBM, CAT, NN_TORCH, RF (seeded likewise) and its default `spunge` augmentation (5x the training rows).
  Installed: LightGBM, CatBoost, XGBoost, torch (CPU); not fastai, so NeuralNetFastAI is skipped in `fit`.
  OMP_NUM_THREADS=1. The best distilled student is the `_DSTL` model with the best validation accuracy in
  `leaderboard()` (the tuning data), as AutoGluon would choose.
- **Latency (p50, batch 1, one thread, {settings["latency_repeats"]} calls after 10 warm-ups).** kd-ops
  (`kd_ops/evaluation/metrics.py` `timing_metrics`): the model's own predict on one already-encoded float32 row (the
  first test row, repeated): the torch forward under `inference_mode` for the MLP, `predict_proba` for the tree,
  the LightGBM booster's `predict` for the teacher; no DataFrame, no encoding. AutoGluon: `predictor.predict_proba(
  test.iloc[[i]], model=name)` on test rows 0-199 (a slow model: as many as fit in 8 s, at least 20), through
  its DataFrame feature pipeline per call; "model call
  alone" is `predictor._trainer.predict_proba` on the same rows already transformed (`transform_features`).
- **Size.** kd-ops: the saved state_dict (MLP), the estimator's saved form (tree, LightGBM model string). AutoGluon:
  bytes on disk of the model's folder plus those of the models it calls (an ensemble's base models), without the
  shared feature-generator pickles.
- **Train / distil s.** kd-ops: `train_time_s` of the run (teacher fit; student distillation). AutoGluon teacher:
  the whole `fit()` wall time; AutoGluon students: fit seconds of the model (and of the models it calls), not
  counting the augmentation and teacher labelling of `distill()` (the whole call is given below each table).
- **Machine.** {settings["cpus"]} CPU cores shared with other benchmark processes, run at nice
  {settings["nice"]}, one process at a time: absolute timings are noisy, ratios are the point.
"""


def markdown(summary: list[dict], settings: dict) -> str:
    return "\n".join([header(settings), tables(summary), "Per dataset:", "", *verdicts(summary), ""])


def write(rows: list[dict], args: argparse.Namespace, out: Path, started: float) -> list[dict]:
    summary = summarize(rows)
    settings = {
        "datasets": args.datasets,
        "seeds": sorted({r["seed"] for r in rows}) or args.seeds,
        "flights_rows": args.flights_rows,
        "autogluon_fit_time_limit_s": args.time_limit,
        "autogluon_distill_time_limit_s": args.distill_limit,
        "autogluon_presets": "medium_quality",
        "latency_repeats": LATENCY_REPEATS,
        "tree": TREE,
        "nice": os.nice(0),
        "cpus": os.cpu_count(),
        "wall_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = [r["autogluon"].get("autogluon_version") for r in rows if r["autogluon"].get("autogluon_version")]
    settings["autogluon_version"] = versions[0] if versions else "1.6"
    for key, field in (
        ("autogluon_fit_time_limit_s", "time_limit"),
        ("autogluon_distill_time_limit_s", "distill_time_limit"),
    ):
        used = {r["autogluon"][field] for r in rows}
        if len(used) == 1:  # the limits the stored runs had (a --summary-only rebuild has no others)
            settings[key] = used.pop()
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=1))
    md = out.with_suffix(".md")
    kept = md.read_text().split(VERDICT, 1)[1] if md.exists() and VERDICT in md.read_text() else "\n"
    md.write_text(markdown(summary, settings) + "\n" + VERDICT + kept)  # the written verdict survives a rebuild
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["churn", "flights"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--time-limit", type=float, default=60.0, help="AutoGluon fit() time_limit, seconds")
    parser.add_argument("--distill-limit", type=float, default=60.0, help="AutoGluon distill() time_limit, seconds")
    parser.add_argument("--flights-rows", type=int, default=60000, help="flights rows sampled (of 327,346)")
    parser.add_argument("--out", default=str(RESULTS / "peers_autogluon"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <out>.json")
    parser.add_argument("--summary-only", action="store_true", help="rebuild <out>.json's summary, no run")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    started = time.perf_counter()
    stored = json.loads(out.with_suffix(".json").read_text()) if args.resume or args.summary_only else {}
    rows = stored.get("runs", [])
    if args.summary_only:  # a rebuild: the study's own wall time, not this call's
        started -= stored.get("settings", {}).get("wall_s", 0.0)
    if not args.summary_only:
        have = {(r["dataset"], r["seed"]) for r in rows}
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets:
                for seed in args.seeds:
                    if (name, seed) in have:
                        continue
                    row = one_seed(args, name, seed, Path(tmp))
                    rows.append(row)
                    write(rows, args, out, started)
                    ag = row["autogluon"]
                    print(
                        f"{name} seed {seed}: kd-ops {row['kd_wall_s']:.0f}s, "
                        f"AutoGluon {row['autogluon_wall_s']:.0f}s; "
                        f"MLP {row['kd_mlp']['test_accuracy']:.4f}, tree {row['kd_tree']['test_accuracy']:.4f}, "
                        f"AG best distilled {ag['best_distilled']}",
                        file=sys.stderr,
                        flush=True,
                    )
    summary = write(rows, args, out, started)
    print(tables(summary))
    print("\n".join(verdicts(summary)))


if __name__ == "__main__":
    main()
