"""What the teacher-output cache saves: training epoch time of KD with a cached teacher vs a live one.

Three variants on mnist5k (full transfer set), same student initialisation, same batches:
  student   the student alone on labels (method none): the floor,
  live      KD (ce_weight 0.1) with the teacher run on every batch,
  cached    the same KD, reading the teacher's logits by row from `kd_ops.distill.cache.TeacherCache`
            (built once before training; its miss and hit times are reported separately).
The teacher (an untrained CNN: only its cost matters here) must cost at least 10x the student per
forward; the measured ratio is printed, with a warning when it falls short.

Epoch time: a callback takes `time.perf_counter()` at each training epoch's start and end; the
first epoch is dropped as warm-up and the median of the rest is kept. Each variant runs
`--repeats` times, interleaved (student, live, cached, student, ...) so a busy spell of a shared
machine hits all three alike, and the median over repeats is reported. Writes
bench/results/cache_speed.json and .md.

    python bench/cache_speed.py                       # 4 epochs x 2 repeats, well under 3 minutes on 2 cores
    python bench/cache_speed.py --epochs 6 --repeats 3
    python bench/cache_speed.py --teacher-channels 96 192   # if the teacher is under 10x the student
"""

from __future__ import annotations

import argparse
import gc
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
from torch import nn

from kd_ops.config.training import DataConfig, DistillConfig
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.distill.cache import CacheKey, TeacherCache, compute_teacher_outputs, model_fingerprint
from kd_ops.distill.losses import build_losses
from kd_ops.distill.module import DistillationModule
from kd_ops.models.zoo import build_model, freeze, param_count

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("student", "live", "cached")
TARGET = 1.10  # cached KD should cost at most this much more than the student alone
MIN_RATIO = 10.0  # the teacher's forward must cost at least this many student forwards


class EpochTimer(L.Callback):
    """Wall-clock seconds of each training epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def forward_ms(model: nn.Module, x: torch.Tensor, calls: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of one inference-mode forward on `x`."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + calls):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def epoch_times(module: DistillationModule, dm: DistillDataModule, epochs: int) -> list[float]:
    """Train `module` for `epochs` epochs on `dm`; the seconds of every epoch, warm-up included."""
    timer = EpochTimer()
    trainer = L.Trainer(
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
    )
    gc.collect()  # a collection of the previous run's garbage should not land in this run's epochs
    trainer.fit(module, datamodule=dm)
    if len(timer.times) != epochs:
        raise RuntimeError(f"timed {len(timer.times)} epochs, expected {epochs}")
    return timer.times


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is dropped (>= 2)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each variant")
    parser.add_argument("--teacher-channels", type=int, nargs="+", default=[64, 128], help="teacher CNN conv widths")
    parser.add_argument("--teacher-hidden", type=int, default=256, help="teacher CNN head width")
    parser.add_argument("--student-hidden", type=int, nargs="*", default=[64], help="student MLP hidden widths")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "cache_speed"), help="output path without suffix")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is warm-up and is dropped")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        # Other processes on the cores: multi-threaded small ops then wait on descheduled threads,
        # which can slow the tiny student far more than the teacher and invert the comparison.
        print(
            f"WARNING: 1-minute load average {load_before:.2f} on {os.cpu_count()} CPUs: the machine is busy, "
            "timings will be noisy (try --threads 1, or run on an idle machine)"
        )

    dm = DistillDataModule(DataConfig(name="mnist5k"), seed=0, role="transfer")
    dm.setup()
    mean, std = dm.normalization()
    rows = dm.splits.transfer
    n_batches = -(-len(rows) // dm.cfg.batch_size)

    teacher_params = {"channels": args.teacher_channels, "hidden": args.teacher_hidden}
    student_params = {"hidden": args.student_hidden}

    def new_student() -> nn.Module:
        return build_model("mlp", student_params, dm.input_shape, dm.n_classes, mean, std)

    torch.manual_seed(0)
    teacher = freeze(build_model("cnn", teacher_params, dm.input_shape, dm.n_classes, mean, std))
    probe = new_student()

    # -- per-forward cost ---------------------------------------------------------------------
    batch = torch.as_tensor(dm.arrays("transfer")[0][:64])
    teacher_ms, student_ms = forward_ms(teacher, batch), forward_ms(probe.eval(), batch)
    ratio = teacher_ms / student_ms
    cost = {"teacher_ms": teacher_ms, "student_ms": student_ms, "ratio": ratio, "batch": len(batch)}
    print(
        f"forward per batch of {len(batch)}: teacher {teacher_ms:.3f} ms, student {student_ms:.3f} ms, "
        f"ratio {ratio:.1f}x (needs >= {MIN_RATIO:.0f}x)"
    )
    if ratio < MIN_RATIO:
        print(
            f"WARNING: the teacher costs only {ratio:.1f}x the student per forward (< {MIN_RATIO:.0f}x); "
            "rerun with a larger teacher, e.g. --teacher-channels 96 192 --teacher-hidden 512"
        )

    # -- the cache: one miss (build), one hit (read back) --------------------------------------
    x = torch.as_tensor(dm.raw.x[rows])  # transfer rows, in the order `rows` gives them
    key = CacheKey(
        teacher_fingerprint=model_fingerprint(teacher),
        dataset_fingerprint=f"{dm.fingerprint()}:transfer",
        transform="identity;single",
    )
    teacher_run_s: list[float] = []

    def compute() -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = compute_teacher_outputs(teacher, x)
        teacher_run_s.append(time.perf_counter() - t0)
        return out

    with tempfile.TemporaryDirectory(prefix="kd-ops-cache-speed-") as tmp:
        building = TeacherCache(tmp)
        t0 = time.perf_counter()
        outputs = building.get_or_compute(key, compute)
        build_s = time.perf_counter() - t0
        reading = TeacherCache(tmp)  # a fresh instance, as a later run would have
        t0 = time.perf_counter()
        read_back = reading.get_or_compute(key, compute)
        read_s = time.perf_counter() - t0
        cache_bytes = reading.path_for(key).stat().st_size
    cache_ok = (
        building.misses == 1
        and reading.hits == 1
        and reading.misses == 0
        and len(teacher_run_s) == 1
        and torch.equal(outputs["logits"], read_back["logits"])
        and outputs["logits"].shape == (len(rows), dm.n_classes)
    )
    with torch.inference_mode():
        live_logits = teacher(x[:64])
    cache_matches_teacher = bool(torch.allclose(outputs["logits"][:64], live_logits, atol=1e-4, rtol=1e-4))
    print(
        f"cache: built in {build_s:.3f} s (teacher {teacher_run_s[0]:.3f} s), read back in {read_s:.4f} s, "
        f"{cache_bytes:,} bytes; hit path taken: {'yes' if cache_ok else 'NO'}; "
        f"cached logits match the teacher: {'yes' if cache_matches_teacher else 'NO'}"
    )
    outputs = read_back  # train on what a later run would read

    # -- training epochs ----------------------------------------------------------------------
    example = x[:4]

    def make(variant: str, seed: int) -> DistillationModule:
        torch.manual_seed(seed)  # same student initialisation in every variant of a repeat
        student = new_student()
        if variant == "student":
            return DistillationModule(student)
        terms = build_losses(DistillConfig(method="kd"))
        if variant == "live":
            module = DistillationModule(student, teacher, terms, ce_weight=0.1)
        else:
            module = DistillationModule(student, teacher, terms, ce_weight=0.1, rows=rows, teacher_outputs=outputs)
        module.prepare(example)  # as the pipeline does before fitting
        return module

    per_epoch: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:  # interleaved: background load hits every variant alike
            times = epoch_times(make(variant, seed=repeat), dm, args.epochs)
            per_epoch[variant].append(times)
            runs[variant].append(statistics.median(times[1:]))
            print(
                f"repeat {repeat + 1}/{args.repeats} {variant:>7}: {runs[variant][-1]:.3f} s/epoch "
                f"(epochs: {', '.join(f'{t:.3f}' for t in times)})",
                flush=True,
            )
    epoch = {v: statistics.median(runs[v]) for v in VARIANTS}
    ratios = {f"{v}_over_student": epoch[v] / epoch["student"] for v in ("live", "cached")}
    within = ratios["cached_over_student"] <= TARGET

    # -- report -------------------------------------------------------------------------------
    machine = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
    }
    machine_text = (
        f"os.cpu_count() {machine['cpu_count']}, torch {machine['torch']}, torch threads {machine['threads']}"
    )
    lines = [
        "| variant | epoch s (median) | ms / step | x student-only |",
        "| --- | --- | --- | --- |",
    ]
    for v in VARIANTS:
        step_ms = 1000 * epoch[v] / n_batches
        lines.append(f"| {v} | {epoch[v]:.3f} | {step_ms:.2f} | {epoch[v] / epoch['student']:.2f} |")
    table = "\n".join(lines)
    target_line = (
        f"cached KD within {TARGET:.2f}x of student-only: {'yes' if within else 'no'} "
        f"({ratios['cached_over_student']:.2f}x); live teacher: {ratios['live_over_student']:.2f}x"
    )
    setup_line = (
        f"mnist5k, {len(rows)} transfer rows, batch {dm.cfg.batch_size} ({n_batches} steps/epoch), "
        f"{args.epochs} epochs per run (first dropped), {args.repeats} interleaved run(s) per variant. "
        f"Teacher CNN {args.teacher_channels} hidden {args.teacher_hidden} ({param_count(teacher):,} params), "
        f"student MLP {args.student_hidden} ({param_count(probe):,} params); teacher forward "
        f"{ratio:.1f}x the student's ({teacher_ms:.2f} ms vs {student_ms:.3f} ms per batch of {len(batch)}). "
        f"Cache built in {build_s:.2f} s (miss), read back in {read_s:.4f} s (hit). Machine: {machine_text}."
    )
    print()
    print(table)
    print(target_line)
    if ratio < MIN_RATIO:
        print(f"WARNING: teacher/student forward cost {ratio:.1f}x < {MIN_RATIO:.0f}x: not the intended regime")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "dataset": {"name": "mnist5k", "transfer_rows": len(rows), "batch_size": dm.cfg.batch_size},
        "params": {"teacher": param_count(teacher), "student": param_count(probe)},
        "forward_cost": cost,
        "forward_cost_ok": ratio >= MIN_RATIO,
        "cache": {
            "build_s": build_s,
            "teacher_s": teacher_run_s[0],
            "read_s": read_s,
            "bytes": cache_bytes,
            "hit_path_ok": cache_ok,
            "matches_teacher": cache_matches_teacher,
        },
        "epoch_s": epoch,
        "runs_epoch_s": runs,
        "all_epoch_s": per_epoch,
        "ratios": ratios,
        "target": TARGET,
        "cached_within_target": within,
        "machine": machine,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"{setup_line}\n\n{table}\n\n{target_line}.\n")


if __name__ == "__main__":
    main()
