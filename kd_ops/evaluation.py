"""Metrics that teacher and students log under the same names on the same split.

Quality metrics come from torchmetrics (F1, calibration error); efficiency metrics are timed
on CPU, single-threaded call by call, because that is where a distilled student is meant to run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error, multiclass_f1_score

from kd_ops.models import freeze, param_count, serialized_size

# Metric names every model logs (teacher, baseline, student), in table order.
COMMON_METRICS = (
    "test_accuracy",
    "test_f1_macro",
    "test_nll",
    "test_ece",
    "param_count",
    "model_size_bytes",
    "latency_ms_p50",
    "latency_ms_p95",
    "throughput_per_s",
)
STUDENT_METRICS = ("agreement_with_teacher", "accuracy_retention", "compression_ratio", "speedup")


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    freeze(model)
    device = next(iter(model.parameters()), torch.empty(0)).device
    xs = torch.as_tensor(x, dtype=torch.float32)
    return torch.cat([model(xs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(xs), batch_size)])


def quality_metrics(
    logits: torch.Tensor, y: np.ndarray, slices: dict[str, np.ndarray], prefix: str = "test"
) -> dict[str, float]:
    target = torch.as_tensor(y, dtype=torch.long)
    n_classes = logits.shape[1]
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    correct = (pred == target).numpy()
    out = {
        f"{prefix}_accuracy": float(correct.mean()),
        f"{prefix}_f1_macro": float(multiclass_f1_score(pred, target, n_classes, average="macro")),
        f"{prefix}_nll": float(F.cross_entropy(logits, target)),
        f"{prefix}_ece": float(multiclass_calibration_error(probs, target, n_classes, n_bins=15, norm="l1")),
    }
    for column, values in slices.items():
        for value in sorted(set(values), key=lambda v: (len(v), v)):
            rows = values == value
            out[f"{prefix}_accuracy_slice_{column}_{value}"] = float(correct[rows].mean())
    return out


def timing_metrics(
    predict: Callable[[Any], Any], one: Any, batch: Any, latency_repeats: int = 200, throughput_repeats: int = 20
) -> dict[str, float]:
    """Batch-of-1 latency percentiles and large-batch throughput of any predict function."""
    for _ in range(10):
        predict(one)
    times = []
    for _ in range(latency_repeats):
        t0 = time.perf_counter()
        predict(one)
        times.append((time.perf_counter() - t0) * 1000)
    predict(batch)
    t0 = time.perf_counter()
    for _ in range(throughput_repeats):
        predict(batch)
    elapsed = time.perf_counter() - t0
    return {
        "latency_ms_p50": float(np.percentile(times, 50)),
        "latency_ms_p95": float(np.percentile(times, 95)),
        "throughput_per_s": len(batch) * throughput_repeats / elapsed,
    }


@contextmanager
def single_thread():
    """Time on one thread: the deployment target of a small student, and stable on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def efficiency_metrics(
    model: nn.Module,
    n_features: int,
    latency_repeats: int = 200,
    throughput_batch: int = 256,
    throughput_repeats: int = 20,
) -> dict[str, float]:
    """Size, batch-of-1 latency percentiles and large-batch throughput, on CPU with one thread."""
    model = freeze(model.cpu())
    with single_thread():
        timing = timing_metrics(
            model,
            torch.randn(1, n_features),
            torch.randn(throughput_batch, n_features),
            latency_repeats,
            throughput_repeats,
        )
    return {"param_count": float(param_count(model)), "model_size_bytes": float(serialized_size(model)), **timing}


def student_extras(student: dict[str, float], teacher: dict[str, float], agreement: float) -> dict[str, float]:
    """What only a student has: how much of the teacher it keeps, and what it saves."""
    return {
        "agreement_with_teacher": agreement,
        "accuracy_retention": student["test_accuracy"] / max(teacher["test_accuracy"], 1e-12),
        "compression_ratio": teacher["param_count"] / max(student["param_count"], 1.0),
        "speedup": teacher["latency_ms_p50"] / max(student["latency_ms_p50"], 1e-12),
    }
