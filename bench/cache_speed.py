"""What the teacher-output cache saves: epoch time of KD with a cached teacher vs a live one.

Three variants on mnist5k (full transfer set), same student, same batches:
  student   the student alone on labels (the floor),
  live      KD with the teacher run on every batch,
  cached    KD reading the teacher's logits from `kd_ops.cache` (built once, before training).
The teacher is sized to cost at least 10x the student per forward. Epoch time is the median over
epochs after the first (warm-up) and over interleaved repeats, so background load hits all three
alike. Writes bench/results/cache_speed.json and .md.

    python bench/cache_speed.py [--epochs 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from kd_ops.cache import CacheKey, TeacherCache, compute_teacher_outputs, model_fingerprint
from kd_ops.config import DataConfig, DistillConfig
from kd_ops.data import DistillDataModule
from kd_ops.distill import DistillationModule
from kd_ops.losses import build_losses
from kd_ops.models import build_model, freeze, param_count

RESULTS = Path(__file__).resolve().parent / "results"


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.times.append(time.perf_counter() - self._t0)


def forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def epoch_seconds(module: DistillationModule, dm: DistillDataModule, epochs: int) -> float:
    timer = EpochTimer()
    L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    ).fit(module, datamodule=dm)
    return statistics.median(timer.times[1:] or timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--teacher-channels", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", default=str(RESULTS / "cache_speed"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    dm = DistillDataModule(DataConfig(name="mnist5k"), seed=0, role="transfer")
    dm.setup()
    mean, std = dm.normalization()
    torch.manual_seed(0)
    teacher = freeze(
        build_model("cnn", {"channels": args.teacher_channels, "hidden": 256}, dm.input_shape, dm.n_classes, mean, std)
    )
    student_init = build_model("mlp", {"hidden": [64]}, dm.input_shape, dm.n_classes, mean, std)
    batch = torch.as_tensor(dm.arrays("transfer")[0][:64])
    cost = {"teacher_ms": forward_ms(teacher, batch), "student_ms": forward_ms(student_init, batch)}
    cost["ratio"] = cost["teacher_ms"] / cost["student_ms"]
    if cost["ratio"] < 10:
        print(f"warning: teacher only {cost['ratio']:.1f}x the student's cost; raise --teacher-channels")

    rows = dm.splits.transfer
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache(tmp)
        key = CacheKey(model_fingerprint(teacher), dm.fingerprint(), "identity")
        x = torch.as_tensor(dm.raw.x[rows])
        t0 = time.perf_counter()
        outputs = cache.get_or_compute(key, lambda: compute_teacher_outputs(teacher, x))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        TeacherCache(tmp).get_or_compute(key, lambda: compute_teacher_outputs(teacher, x))
        read_s = time.perf_counter() - t0

    def make(variant: str) -> DistillationModule:
        torch.manual_seed(1)
        student = build_model("mlp", {"hidden": [64]}, dm.input_shape, dm.n_classes, mean, std)
        if variant == "student":
            return DistillationModule(student)
        terms = build_losses(DistillConfig(method="kd"))
        cached = outputs if variant == "cached" else None
        return DistillationModule(student, teacher, terms, ce_weight=0.1, rows=rows, teacher_outputs=cached)

    variants = ("student", "live", "cached")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved: a slow spell of the machine hits every variant
            times[v].append(epoch_seconds(make(v), dm, args.epochs))
    epoch = {v: statistics.median(t) for v, t in times.items()}
    ratios = {f"{v}_over_student": epoch[v] / epoch["student"] for v in ("live", "cached")}
    within = ratios["cached_over_student"] <= 1.10

    machine = f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    table = "\n".join(
        [
            "| variant | epoch s (median) | x student-only |",
            "| --- | --- | --- |",
            *(f"| {v} | {epoch[v]:.3f} | {epoch[v] / epoch['student']:.2f} |" for v in variants),
        ]
    )
    text = (
        f"mnist5k, {len(rows)} transfer rows, batch {dm.cfg.batch_size}, {args.epochs} epochs x {args.repeats} "
        f"repeats (first epoch dropped). Teacher CNN {args.teacher_channels} ({param_count(teacher):,} params), "
        f"student MLP [64] ({param_count(student_init):,} params); teacher forward {cost['ratio']:.1f}x the "
        f"student's ({cost['teacher_ms']:.2f} ms vs {cost['student_ms']:.2f} ms per batch of 64). Cache built in "
        f"{build_s:.2f} s, read back in {read_s:.3f} s. {machine}.\n\n{table}\n\n"
        f"cached KD within 1.10x of student-only: {'yes' if within else 'no'} ({ratios['cached_over_student']:.2f}x); "
        f"live teacher: {ratios['live_over_student']:.2f}x.\n"
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "settings": vars(args),
                "forward_cost": cost,
                "epoch_s": epoch,
                "all_epoch_s": times,
                "ratios": ratios,
                "cache_build_s": build_s,
                "cache_read_s": read_s,
                "machine": machine,
            },
            indent=2,
        )
    )
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
