"""Metrics that teacher, students and edge exports log under the same names on the same split.

A model is wrapped as a `Candidate` (raw rows in, log-probabilities out, plus its size), so a
network, a scikit-learn estimator and an ONNX file run by onnxruntime are scored by one code
path. Quality metrics come from torchmetrics (F1, calibration error, confusion matrix);
efficiency is timed on CPU with one thread, call by call, because that is where a distilled
student is meant to run, and a single thread keeps the figures stable on a busy machine.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from kd_ops.models.zoo import freeze, param_count, serialized_size

# Metric names every model logs (teacher, baseline, student, edge exports), in table order.
COMMON_METRICS = (
    "test_accuracy",
    "test_f1_macro",
    "test_roc_auc",
    "test_nll",
    "test_ece",
    "robust_accuracy_noise",
    "robust_accuracy_shift",
    "robust_accuracy_contrast",
    "param_count",
    "model_size_bytes",
    "peak_memory_bytes",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_p99",
    "throughput_per_s",
)
STUDENT_METRICS = ("agreement_with_teacher", "accuracy_retention", "compression_ratio", "speedup")
CORRUPTION_KINDS = ("noise", "shift", "contrast")


@dataclass
class Candidate:
    """One deployable model, however it runs: raw float32 rows -> (n, classes) logits (torch) or
    log-probabilities (scikit-learn, ONNX exports of either); a softmax gives probabilities for all."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    param_count: int
    size_bytes: int
    peak_memory: Callable[[np.ndarray], int] = field(repr=False, default=lambda x: 0)


@dataclass
class EvaluationSettings:
    """How hard to time: from the config's `evaluation` section (defaults match it)."""

    latency_repeats: int = 200
    throughput_batch: int = 256
    throughput_batches: Sequence[int] = (1, 32, 256)
    throughput_repeats: int = 20
    robustness: bool = True

    @classmethod
    def from_config(cls, section: Any) -> "EvaluationSettings":
        return cls(
            section.latency_repeats,
            section.throughput_batch,
            tuple(section.throughput_batches),
            section.throughput_repeats,
            section.robustness,
        )


@dataclass
class Evaluation:
    """Metrics of one candidate on one split, plus what does not fit in a metric."""

    metrics: dict[str, float]
    logits: torch.Tensor = field(repr=False)
    confusion: np.ndarray = field(repr=False)


# -- candidates -----------------------------------------------------------------------------------


def activation_peak_bytes(model: nn.Module, x: np.ndarray) -> int:
    """Peak bytes allocated during one forward pass, from the torch profiler's memory events.

    The profiler attributes each allocation and free to the op (or free-standing memory event)
    that made it; walking them in time order gives the high-water mark of live activations.
    """
    from torch.profiler import ProfilerActivity, profile

    xs = torch.as_tensor(x, dtype=torch.float32)
    with _native_stderr_silenced(), torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(xs)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


_STDERR_LOCK = threading.Lock()


@contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side prints start/stop lines straight to file descriptor 2."""
    import os
    import sys

    with _STDERR_LOCK:  # fd 2 is process-wide: one redirection at a time
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 2)
                yield
            finally:
                os.dup2(saved, 2)
                os.close(devnull)
        finally:
            os.close(saved)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def torch_candidate(model: nn.Module, name: str = "torch") -> Candidate:
    model = freeze(model.cpu())

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.as_tensor(x, dtype=torch.float32)).numpy()

    return Candidate(
        name,
        predict,
        param_count(model),
        serialized_size(model),
        lambda x: _weight_bytes(model) + activation_peak_bytes(model, x),
    )


def sklearn_candidate(est: Any, name: str = "sklearn") -> Candidate:
    import tracemalloc

    from kd_ops.models.estimators import estimator_size

    def predict(x: np.ndarray) -> np.ndarray:
        return np.log(np.clip(est.predict_proba(x), 1e-12, None)).astype(np.float32)

    def peak(x: np.ndarray) -> int:  # numpy's buffers are traced by tracemalloc
        tracemalloc.start()
        try:
            predict(x)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    size = estimator_size(est)
    return Candidate(
        name, predict, size["param_count"], size["model_size_bytes"], lambda x: size["model_size_bytes"] + peak(x)
    )


def model_candidate(model: Any, name: str) -> Candidate:
    """A network as a torch candidate; anything with `predict_proba` (a scikit-learn estimator, a
    boosted ensemble behind `EstimatorTeacher`) as an estimator candidate."""
    if isinstance(model, nn.Module) and not hasattr(model, "predict_proba"):
        return torch_candidate(model, name)
    return sklearn_candidate(model, name)


# -- metrics ----------------------------------------------------------------------------------


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
    auc = roc_auc(probs.numpy(), np.asarray(y))
    if auc is not None:
        out[f"{prefix}_roc_auc"] = auc
    for column, values in slices.items():
        for value in sorted(set(values), key=lambda v: (len(v), v)):
            rows = values == value
            out[f"{prefix}_accuracy_slice_{column}_{metric_safe(value)}"] = float(correct[rows].mean())
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_safe(value: str) -> str:
    """A slice value as part of an MLflow metric name (letters, digits, _ - . space /): a user's
    category such as "Bank transfer (automatic)" becomes "Bank transfer _automatic_"."""
    return _UNSAFE.sub("_", str(value))[:120]


def roc_auc(probs: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC: of class 1 for two classes, one-vs-rest macro for more; None when a class the
    model knows is absent from `y` (the multiclass AUC is undefined then)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return None
    p = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def confusion(logits: torch.Tensor, y: np.ndarray) -> np.ndarray:
    """Rows: true class; columns: predicted class; counts."""
    target = torch.as_tensor(y, dtype=torch.long)
    return multiclass_confusion_matrix(logits.argmax(1), target, logits.shape[1]).numpy()


def tile(rows: np.ndarray, n: int) -> np.ndarray:
    """`n` real rows (repeated when there are fewer), contiguous float32: a batch to time or profile."""
    return np.ascontiguousarray(np.resize(rows, (n, rows.shape[1])), dtype=np.float32)


def timing_metrics(
    predict: Callable[[Any], Any],
    rows: np.ndarray,
    latency_repeats: int = 200,
    throughput_batch: int = 256,
    throughput_batches: Sequence[int] = (),
    throughput_repeats: int = 20,
) -> dict[str, float]:
    """Batch-of-1 latency percentiles and throughput at each batch size, of any predict function.

    `rows` are real inputs (tiled when a batch needs more): some models (trees) take time that
    depends on the values.
    """

    one = tile(rows, 1)
    for _ in range(10):
        predict(one)
    times = []
    for _ in range(latency_repeats):
        t0 = time.perf_counter()
        predict(one)
        times.append((time.perf_counter() - t0) * 1000)
    out = {f"latency_ms_p{q}": float(np.percentile(times, q)) for q in (50, 95, 99)}
    for n in dict.fromkeys([*throughput_batches, throughput_batch]):
        xb = tile(rows, n)
        predict(xb)
        repeats = max(throughput_repeats, throughput_repeats * throughput_batch // (n * 8))  # small batches: more calls
        t0 = time.perf_counter()
        for _ in range(repeats):
            predict(xb)
        rate = n * repeats / (time.perf_counter() - t0)
        out[f"throughput_per_s_bs{n}"] = rate
        if n == throughput_batch:
            out["throughput_per_s"] = rate
    return out


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


def efficiency_metrics(candidate: Candidate, rows: np.ndarray, settings: EvaluationSettings) -> dict[str, float]:
    """Size, peak memory, batch-of-1 latency percentiles and throughput, on CPU with one thread."""
    with single_thread():
        timing = timing_metrics(
            candidate.predict,
            rows,
            settings.latency_repeats,
            settings.throughput_batch,
            settings.throughput_batches,
            settings.throughput_repeats,
        )
        peak = candidate.peak_memory(tile(rows, settings.throughput_batch))
    return {
        "param_count": float(candidate.param_count),
        "model_size_bytes": float(candidate.size_bytes),
        "peak_memory_bytes": float(peak),
        **timing,
    }


def evaluate_candidate(
    candidate: Candidate, dm: Any, settings: EvaluationSettings | None = None, split: str = "test"
) -> Evaluation:
    """Quality on `split` (metric names keep the `test_` prefix only for the test split),
    robustness under each corruption of the same rows, and efficiency."""
    settings = settings or EvaluationSettings()
    x, y = dm.arrays(split)
    logits = torch.as_tensor(candidate.predict(x), dtype=torch.float32)
    metrics = quality_metrics(logits, y, dm.slices(split), prefix=split)
    if settings.robustness and len(getattr(dm, "input_shape", ())) == 3:  # the corruptions are of images
        for kind in CORRUPTION_KINDS:
            xc, _ = dm.corrupted(split, kind)
            pred = np.asarray(candidate.predict(xc)).argmax(1)
            metrics[f"robust_accuracy_{kind}"] = float((pred == y).mean())
    metrics.update(efficiency_metrics(candidate, x, settings))
    return Evaluation(metrics, logits, confusion(logits, y))


def student_extras(
    student: dict[str, float], teacher: dict[str, float], agreement: float, accuracy_key: str = "test_accuracy"
) -> dict[str, float]:
    """What only a student has: how much of the teacher it keeps, and what it saves."""
    return {
        "agreement_with_teacher": agreement,
        "accuracy_retention": student[accuracy_key] / max(teacher[accuracy_key], 1e-12),
        "compression_ratio": teacher["param_count"] / max(student["param_count"], 1.0),
        "speedup": teacher["latency_ms_p50"] / max(student["latency_ms_p50"], 1e-12),
    }


def known_metric(name: str) -> bool:
    """Whether `name` is a metric an evaluation can produce (gates refuse anything else)."""
    if name in COMMON_METRICS or name in STUDENT_METRICS:
        return True
    for prefix in ("test_accuracy_slice_", "throughput_per_s_bs"):
        if name.startswith(prefix) and len(name) > len(prefix):
            return True
    return False
