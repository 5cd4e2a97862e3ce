"""kd-ops' KD against torchdistill 1.1.5's, side by side: same teacher, student, rows, seeds and steps.

Is kd-ops' Hinton KD as good as a research library's, and does its Lightning + MLflow loop cost more
per epoch? For each dataset and seed, kd-ops runs `examples/<dataset>.yaml` (plain KD: no mixup,
since torchdistill's KD has none; no baseline, edge exports or gates). Then torchdistill trains a
second student from the very same start: the teacher kd-ops trained (exported with torch.export),
the student's initial weights (rebuilt as kd-ops builds them, same seed), the same transfer rows
in the same shuffled order (same loader seed), the same number of epochs (kd-ops' `effective_epochs`),
batch size, AdamW + per-epoch cosine schedule and loss (ce_weight·CE + kd_weight·T²·KL, which is
torchdistill's KDLoss with alpha=ce_weight, beta=kd_weight). Only the training loop and the loss
code differ, so accuracy should agree within seed noise and the time per epoch is the loops' cost.

torchdistill runs in its own venv (bench/.venv-torchdistill, bench/peers/README.md) through
`bench/peers/torchdistill_worker.py`, which imports nothing of kd-ops. Run from the kd-ops venv:

    python bench/peer_torchdistill.py                      # digits and mnist5k, seeds 0 1 2
    python bench/peer_torchdistill.py --datasets digits --seeds 0

Writes bench/results/peers_torchdistill.json (every row and the summary) and .md; the .json is
rewritten after each (dataset, seed), and `--resume` skips the pairs it already holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from shared import RESULTS, ROOT, mean_std, save_results  # bench/shared.py (bench/ is on sys.path when run)

PEER_PYTHON = ROOT / "bench" / ".venv-torchdistill" / "bin" / "python"
WORKER = ROOT / "bench" / "peers" / "torchdistill_worker.py"
OUT = RESULTS / "peers_torchdistill"
DATASETS = ("digits", "mnist5k")
SEEDS = (0, 1, 2)
ARMS = ("kd_ops", "torchdistill", "torchdistill_cached")
ARM_NAMES = {
    "kd_ops": "kd-ops KD",
    "torchdistill": "torchdistill KD",
    "torchdistill_cached": "torchdistill KD, cached teacher logits",
}
WORKER_TIMEOUT_S = 3600


def overrides(seed: int, tmp: Path) -> list[str]:
    """Plain KD on both sides (torchdistill's KDLoss has no mixup), nothing but the student to time."""
    return [
        f"seed={seed}",
        "distill.mixup=0",
        f"tracking.uri=sqlite:///{tmp}/bench.db",
        f"distill.cache.dir={tmp}/cache",
        "train.progress_bar=false",
        "evaluation.edge=[]",
        "evaluation.latency_repeats=20",
        "evaluation.throughput_repeats=2",
        "gates={}",
        "distill.baseline=false",
    ]


def epoch_times(client, run_id: str) -> float:
    """kd-ops' seconds per epoch inside Lightning's loop, from the timestamps of the once-per-epoch
    `train_loss`: the trainer's setup and teardown left out, validation and logging kept in."""
    history = sorted(m.timestamp for m in client.get_metric_history(run_id, "train_loss"))
    return (history[-1] - history[0]) / 1000 / (len(history) - 1) if len(history) > 1 else float("nan")


def hand_over(cfg, result, epochs: int, folder: Path) -> dict:
    """Everything torchdistill needs to train the same student from the same start, into `folder`:
    the teacher as a torch.export program (dynamic batch), the student's initial state_dict, the
    rows, and the hyper-parameters. Returns the hyper-parameters."""
    from kd_ops.models.zoo import build_model
    from kd_ops.pipeline.distillation import VALIDATIONS_PER_RUN

    dm = result.datamodule
    mean, std = dm.normalization()
    # As kd-ops' `_new_model` for `new_student(1)`: the seed, then the build, nothing in between.
    torch.manual_seed(cfg.seed + 1)
    student = build_model(cfg.student.model, cfg.student.params, dm.input_shape, dm.n_classes, mean, std)
    torch.save(student.state_dict(), folder / "student_init.pt")

    x_val = dm.arrays("val")[0]
    teacher = result.models["teacher"].eval()
    program = torch.export.export(
        teacher, (torch.as_tensor(x_val[:5]),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    torch.export.save(program, str(folder / "teacher.pt2"))
    arrays = {}
    for split in ("transfer", "val", "test"):
        x, y = dm.arrays(split)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x.astype(np.float32), y.astype(np.int64)
    np.savez(folder / "arrays.npz", **arrays)

    d = cfg.distill
    hp = {
        "seed": cfg.seed,
        "loader_seed": dm.seed,  # kd-ops' DataLoader shuffles with Generator().manual_seed(dm.seed)
        "epochs": epochs,
        "val_every": max(1, epochs // VALIDATIONS_PER_RUN),  # kd-ops' check_val_every_n_epoch
        "batch_size": cfg.data.batch_size,
        "lr": cfg.student.lr,
        "weight_decay": cfg.student.weight_decay,
        "temperature": d.temperature,
        "kd_weight": d.kd_weight,
        "ce_weight": d.ce_weight,
        "hidden": list(cfg.student.params.get("hidden", [64])),
        "input_dim": int(np.prod(dm.input_shape)),
        "n_classes": int(dm.n_classes),
        "mean": mean,
        "std": std,
    }
    (folder / "hparams.json").write_text(json.dumps(hp, indent=1))
    return hp


def check_plain_kd(cfg) -> None:
    """The comparison holds only for plain KD on an MLP: anything else would be a different recipe."""
    d = cfg.distill
    changing = {k: getattr(d, k) for k in ("mixup", "cutmix", "swap_noise", "jitter")}
    if d.method != "kd" or any(changing.values()) or cfg.student.model != "mlp" or d.losses:
        raise SystemExit(f"not plain KD into an MLP: method={d.method}, {changing}, student={cfg.student.model}")
    if cfg.student.params.get("dropout", 0):
        raise SystemExit("the worker's MLP has no dropout")


def run_one(name: str, seed: int) -> dict:
    """kd-ops on (dataset, seed), then torchdistill on what kd-ops used; one row of results."""
    from mlflow.tracking import MlflowClient

    from kd_ops.config.loading import load_config
    from kd_ops.pipeline.distillation import run_distillation

    with tempfile.TemporaryDirectory(prefix=f"peer-td-{name}-{seed}-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = load_config(ROOT / "examples" / f"{name}.yaml", overrides(seed, tmp))
        check_plain_kd(cfg)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            result = run_distillation(cfg)
        kd_wall = time.perf_counter() - t0
        client = MlflowClient(cfg.tracking.uri)
        student_run = client.get_run(result.runs["student"])
        epochs = int(student_run.data.params["effective_epochs"])
        m = result.metrics
        row = {
            "dataset": name,
            "seed": seed,
            "epochs": epochs,
            "batch_size": cfg.data.batch_size,
            "transfer_rows": int(len(result.datamodule.arrays("transfer")[1])),
            "teacher_accuracy": m["teacher"]["test_accuracy"],
            "kd_ops_accuracy": m["student"]["test_accuracy"],
            "kd_ops_agreement": m["student"]["agreement_with_teacher"],
            "kd_ops_train_time_s": m["student"]["train_time_s"],
            "kd_ops_seconds_per_epoch": m["student"]["train_time_s"] / epochs,
            "kd_ops_in_loop_seconds_per_epoch": epoch_times(client, result.runs["student"]),
            "kd_ops_teacher_cache_s": student_run.data.metrics.get("teacher_cache_s", float("nan")),
            "kd_ops_wall_s": kd_wall,
        }
        folder = tmp / "handover"
        folder.mkdir()
        hp = hand_over(cfg, result, epochs, folder)
        with torch.no_grad():
            kd_pred = result.models["student"].eval()(torch.as_tensor(result.datamodule.arrays("test")[0]))
        kd_pred = kd_pred.argmax(1).numpy()
        row["hparams"] = {k: v for k, v in hp.items() if k not in ("mean", "std")}
        t0 = time.perf_counter()
        done = subprocess.run(
            ["nice", "-n", "5", str(PEER_PYTHON), str(WORKER), str(folder)],
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"torchdistill worker failed on {name} seed {seed} (exit {done.returncode})")
        peer = json.loads(done.stdout.strip().splitlines()[-1])
        row["torchdistill_wall_s"] = time.perf_counter() - t0
    for prefix, arm in (("", "torchdistill"), ("cached_", "torchdistill_cached")):
        for key in ("accuracy", "agreement", "seconds_per_epoch", "train_seconds_per_epoch", "steps"):
            row[f"{arm}_{key}"] = peer[f"{prefix}{key}"]
        if peer[f"{prefix}epochs"] != epochs:
            raise SystemExit(f"worker trained {peer[f'{prefix}epochs']} epochs, kd-ops {epochs}")
    row["same_test_predictions"] = float((np.asarray(peer["test_predictions"]) == kd_pred).mean())
    row["torchdistill_teacher_cache_s"] = peer["teacher_cache_s"]
    row["torchdistill_teacher_accuracy"] = peer["teacher_accuracy"]
    return row


def _stats(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]  # NaN left out
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


METRICS = ("accuracy", "agreement", "seconds_per_epoch")


def summarize(rows: list[dict]) -> dict:
    """Per dataset: mean and std over seeds of each arm's accuracy, agreement and seconds per epoch."""
    summary = {}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        entry = {
            "seeds": [r["seed"] for r in mine],
            "epochs": sorted({r["epochs"] for r in mine}),
            "teacher_accuracy": _stats([r["teacher_accuracy"] for r in mine]),
            "kd_ops_in_loop_seconds_per_epoch": _stats([r["kd_ops_in_loop_seconds_per_epoch"] for r in mine]),
            "accuracy_difference": _stats([r["kd_ops_accuracy"] - r["torchdistill_accuracy"] for r in mine]),
            "same_test_predictions": _stats([r["same_test_predictions"] for r in mine]),
        }
        for arm in ARMS:
            entry[arm] = {metric: _stats([r[f"{arm}_{metric}"] for r in mine]) for metric in METRICS}
        kd, td = entry["kd_ops"], entry["torchdistill"]
        entry["accuracy_within_one_std"] = abs(kd["accuracy"]["mean"] - td["accuracy"]["mean"]) <= max(
            kd["accuracy"]["std"], td["accuracy"]["std"]
        )
        for arm in ARMS[1:]:
            entry[f"seconds_per_epoch_ratio_vs_{arm}"] = (
                kd["seconds_per_epoch"]["mean"] / entry[arm]["seconds_per_epoch"]["mean"]
            )
        summary[name] = entry
    return summary


def render(rows: list[dict], summary: dict, settings: dict) -> str:
    lines = [
        "# kd-ops KD vs torchdistill 1.1.5 KD",
        "",
        f"Run by `python bench/peer_torchdistill.py` ({settings['when']}, torch {settings['torch']} on both sides,"
        " CPU, one torch thread per process, one process at a time, `nice -n 5` on a 2-core machine shared with"
        " other benchmarks: seconds vary by tens of percent between seeds).",
        "",
        f"- Configs: {', '.join(f'`examples/{name}.yaml`' for name in summary)}, with `--set`"
        f" {', '.join(f'`{s}`' for s in settings['overrides'])} (`<tmp>`: a fresh folder per run).",
        f"- Seeds: {' '.join(map(str, settings['seeds']))}. Per seed kd-ops trains the teacher, then its KD student;"
        " torchdistill trains a student from the same initial weights (rebuilt as kd-ops' `new_student(1)`:"
        " seed + 1), against the same teacher (torch.export), on the same transfer rows in the same shuffled"
        " order (the same loader seed), through its `DistillationBox` with `KDLoss` under `WeightedSumLoss`.",
        "- torchdistill KD, cached teacher logits: the same again, with the teacher's logits over the transfer"
        " rows computed once and handed to `KDLoss` through the batch's supplementary dict (kd-ops reads them"
        " from its teacher-output cache; torchdistill 1.1.5 has none and runs the teacher every step).",
    ]
    for name, entry in summary.items():
        r0 = next(r for r in rows if r["dataset"] == name)
        hp = r0["hparams"]
        lines.append(
            f"- {name}: {r0['transfer_rows']} transfer rows, batch size {r0['batch_size']},"
            f" {'/'.join(map(str, entry['epochs']))} epochs (kd-ops' `effective_epochs`: at least"
            f" `student.min_steps` steps; {r0['torchdistill_steps']} steps), AdamW lr {hp['lr']:g} weight decay"
            f" {hp['weight_decay']:g}, cosine over the epochs, loss {hp['ce_weight']:g}·CE +"
            f" {hp['kd_weight']:g}·T²·KL at T = {hp['temperature']:g}, MLP hidden {hp['hidden']};"
            f" validation every {hp['val_every']} epoch(s) on both sides."
        )
    lines += [
        "- Seconds per epoch: kd-ops' `train_time_s` (its whole `Trainer.fit`: setup, sanity check, epochs,"
        " validation, MLflow logging) / epochs; torchdistill's: its epoch loop (pre_epoch_process,"
        " forward_process, post_forward_process, post_epoch_process, and the same validations) / epochs."
        " Neither counts the teacher-output cache, which is computed before training.",
        "",
    ]
    for name, entry in summary.items():
        mine = [r for r in rows if r["dataset"] == name]
        teacher = mean_std([r["teacher_accuracy"] for r in mine])
        lines += [
            f"## {name}",
            "",
            "| arm | test accuracy | agreement with teacher | seconds per epoch | teacher accuracy |",
            "| --- | --- | --- | --- | --- |",
        ]
        for arm in ARMS:
            cells = [
                mean_std([r[f"{arm}_accuracy"] for r in mine]),
                mean_std([r[f"{arm}_agreement"] for r in mine]),
                mean_std([r[f"{arm}_seconds_per_epoch"] for r in mine], ".4f"),
            ]
            lines.append(f"| {ARM_NAMES[arm]} | {' | '.join(cells)} | {teacher} |")
        lines += [
            "",
            "Per seed: test accuracy kd-ops / torchdistill / cached; test rows where kd-ops' and torchdistill's"
            " students predict the same class; seconds per epoch of kd-ops (whole fit; between the first and last"
            " epoch's MLflow timestamps), torchdistill (with validation; training only) and cached; teacher-output"
            " cache seconds kd-ops / torchdistill.",
            "",
        ]
        for r in mine:
            lines.append(
                f"- seed {r['seed']}: {r['kd_ops_accuracy']:.4f} / {r['torchdistill_accuracy']:.4f} /"
                f" {r['torchdistill_cached_accuracy']:.4f}; {r['same_test_predictions']:.1%} same;"
                f" {r['kd_ops_seconds_per_epoch']:.4f} ({r['kd_ops_in_loop_seconds_per_epoch']:.4f}),"
                f" {r['torchdistill_seconds_per_epoch']:.4f} ({r['torchdistill_train_seconds_per_epoch']:.4f}),"
                f" {r['torchdistill_cached_seconds_per_epoch']:.4f} s;"
                f" cache {r['kd_ops_teacher_cache_s']:.2f} / {r['torchdistill_teacher_cache_s']:.2f} s"
            )
        lines.append("")
    lines += ["## Verdict", "", settings.get("verdict") or verdict(summary), ""]
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """The one-paragraph answer, from the numbers: accuracy within one std, and the time ratios."""
    parts = []
    for name, e in summary.items():
        kd, td, tc = e["kd_ops"], e["torchdistill"], e["torchdistill_cached"]
        parts.append(
            f"On {name} kd-ops' KD reaches {kd['accuracy']['mean']:.3f} test accuracy against torchdistill's"
            f" {td['accuracy']['mean']:.3f} ({'within' if e['accuracy_within_one_std'] else 'not within'} one std;"
            f" {e['same_test_predictions']['mean']:.1%} of test rows predicted alike), at"
            f" {e['seconds_per_epoch_ratio_vs_torchdistill']:.2f}x torchdistill's seconds per epoch"
            f" ({kd['seconds_per_epoch']['mean']:.4f} against {td['seconds_per_epoch']['mean']:.4f} s) and"
            f" {e['seconds_per_epoch_ratio_vs_torchdistill_cached']:.2f}x torchdistill's with cached teacher logits"
            f" ({tc['seconds_per_epoch']['mean']:.4f} s)."
        )
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", default=str(OUT), help="results path without extension")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in <out>.json")
    parser.add_argument("--verdict", default="", help="the verdict paragraph (default: one made from the numbers)")
    parser.add_argument("--render", action="store_true", help="only rewrite <out>.md and .json from <out>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kd_ops").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: see bench/peers/README.md")

    rows: list[dict] = []
    settings = {
        "when": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "overrides": overrides(0, Path("<tmp>"))[1:],
        "seeds": args.seeds,
        "verdict": args.verdict,
    }
    if args.resume or args.render:
        previous = json.loads(Path(f"{args.out}.json").read_text())
        rows = previous.get("rows", [])
        if args.render:  # the run's own settings, a new verdict
            settings = {**previous["settings"], "verdict": args.verdict or previous["settings"].get("verdict", "")}
            summary = summarize(rows)
            payload = {"settings": settings, "rows": rows, "summary": summary}
            save_results(args.out, render(rows, summary, settings), payload)
            return
    for name in args.datasets:
        for seed in args.seeds:
            if any(r["dataset"] == name and r["seed"] == seed for r in rows):
                continue
            t0 = time.perf_counter()
            rows.append(run_one(name, seed))
            r = rows[-1]
            print(
                f"{name} seed {seed}: kd-ops {r['kd_ops_accuracy']:.4f} ({r['kd_ops_seconds_per_epoch']:.4f} s/epoch),"
                f" torchdistill {r['torchdistill_accuracy']:.4f} ({r['torchdistill_seconds_per_epoch']:.4f} s/epoch),"
                f" {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            summary = summarize(rows)
            save_results(
                args.out, render(rows, summary, settings), {"settings": settings, "rows": rows, "summary": summary}
            )


if __name__ == "__main__":
    main()
