"""The figures a reviewer looks at before trusting a student, as PNG files (matplotlib, Agg).

- accuracy vs batch-of-1 latency and accuracy vs size: where each model sits on the trade-off;
- reliability diagram: whether the student's confidence means what the teacher's does;
- per-slice accuracy bars: where the student loses what the teacher knew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

COLORS = {
    "teacher": "#1f77b4",
    "baseline": "#7f7f7f",
    "student": "#d62728",
    "student-onnx": "#2ca02c",
    "student-onnx_int8": "#9467bd",
}
CORE_ROLES = ("teacher", "baseline", "student")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _color(role: str) -> str:
    return COLORS.get(role, "#2ca02c")


def tradeoff(metrics: Mapping[str, Mapping[str, float]], x_key: str, x_label: str, path: Path) -> Path:
    """Test accuracy against one cost (log scale), one point per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for i, (role, m) in enumerate(metrics.items()):
        if x_key in m and "test_accuracy" in m:
            ax.scatter(m[x_key], m["test_accuracy"], s=70, color=_color(role), zorder=3, label=role)
            dy = 6 if i % 2 == 0 else -14  # neighbours (a student and its exports) alternate above/below
            ax.annotate(role, (m[x_key], m["test_accuracy"]), textcoords="offset points", xytext=(6, dy), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title(f"accuracy vs {x_label.split(' (')[0]}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reliability_curve(logits: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) per confidence bin with at least one row."""
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    out = [(conf[which == b].mean(), (pred == y)[which == b].mean(), (which == b).sum()) for b in np.unique(which)]
    return tuple(np.array(col) for col in zip(*out)) if out else (np.array([]),) * 3


def reliability(logits: Mapping[str, np.ndarray], y: np.ndarray, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5), dpi=110)
    ax.plot([0, 1], [0, 1], "--", color="black", lw=1, label="perfectly calibrated")
    for role, lg in logits.items():
        conf, acc, _ = reliability_curve(np.asarray(lg), y)
        ax.plot(conf, acc, "o-", color=_color(role), label=role)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title("reliability diagram (test split)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def slice_bars(metrics: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Grouped bars: one group per slice, one bar per model."""
    plt = _plt()
    prefix = "test_accuracy_slice_"
    roles = list(metrics)
    keys = [k for k in next(iter(metrics.values())) if k.startswith(prefix)]
    x = np.arange(len(keys))
    width = 0.8 / max(len(roles), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(keys) + 2), 4.2), dpi=110)
    for i, role in enumerate(roles):
        ax.bar(x + i * width, [metrics[role].get(k, np.nan) for k in keys], width, color=_color(role), label=role)
    ax.set_xticks(x + width * (len(roles) - 1) / 2, [k.removeprefix(prefix) for k in keys], rotation=45, ha="right")
    lows = [metrics[r].get(k, 1.0) for r in roles for k in keys]
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy per slice")
    ax.legend(fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def all_figures(
    metrics: Mapping[str, Mapping[str, float]], logits: Mapping[str, np.ndarray], y: np.ndarray, out_dir: Path
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        tradeoff(metrics, "latency_ms_p50", "latency p50 at batch 1 (ms, log)", out_dir / "accuracy_vs_latency.png"),
        tradeoff(metrics, "model_size_bytes", "serialized size (bytes, log)", out_dir / "accuracy_vs_size.png"),
        reliability({r: lg for r, lg in logits.items() if r in CORE_ROLES}, y, out_dir / "reliability.png"),
        slice_bars({r: m for r, m in metrics.items() if r in CORE_ROLES}, out_dir / "slice_accuracy.png"),
    ]
