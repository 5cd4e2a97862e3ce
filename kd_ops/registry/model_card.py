"""The model card: what a registered student is, in Markdown, on the model version itself.

MLflow renders a version's description as Markdown, so the card is what someone opening the
version in the registry reads first: where the student came from, on what data, how it
compares with its teacher and baseline on the same rows, and which gates it passed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

ROWS = (
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("test_f1_macro", "macro F1", "{:.4f}"),
    ("test_ece", "calibration error (ECE)", "{:.4f}"),
    ("robust_accuracy_noise", "accuracy, noisy inputs", "{:.4f}"),
    ("robust_accuracy_shift", "accuracy, shifted inputs", "{:.4f}"),
    ("robust_accuracy_contrast", "accuracy, low contrast", "{:.4f}"),
    ("param_count", "parameters", "{:,.0f}"),
    ("model_size_bytes", "size (bytes)", "{:,.0f}"),
    ("latency_ms_p95", "latency p95, batch 1 (ms)", "{:.3f}"),
    ("throughput_per_s", "throughput (rows/s)", "{:,.0f}"),
)


def _cell(metrics: Mapping[str, float], key: str, fmt: str) -> str:
    return fmt.format(metrics[key]) if key in metrics else "-"


def render(
    *,
    name: str,
    version: str,
    student: str,
    method: str,
    temperature: float,
    teacher_uri: str,
    data: Mapping[str, Any],
    lineage: Mapping[str, str],
    metrics: Mapping[str, Mapping[str, float]],
    gates: Sequence[Mapping[str, Any]],
    promoted: bool | None,
    run_id: str,
) -> str:
    s = metrics["student"]
    roles = [r for r in metrics if r in ("teacher", "baseline", "student") or r.startswith("student-")]
    lines = [
        f"# {name} v{version}",
        "",
        f"A `{student}` student distilled with `{method}` (T = {temperature:g}) from teacher `{teacher_uri}`.",
        "",
        "## Data",
        f"- dataset `{data['name']}`, transfer set {data['train_fraction']:.0%} of the training split"
        + (f", classes {data['exclude_classes']} left out" if data.get("exclude_classes") else ""),
        f"- dataset and split fingerprint `{lineage.get('kd_ops.dataset_fingerprint', '?')}`; "
        f"config hash `{lineage.get('kd_ops.config_hash', '?')}`; code `{lineage.get('kd_ops.code_version', '?')}`",
        "- inputs: raw feature rows (normalisation is inside the model); output: class logits",
        "",
        "## Against the teacher (same test rows)",
        "",
        "| metric | " + " | ".join(roles) + " |",
        "| --- |" + " --- |" * len(roles),
    ]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(metrics[r], key, fmt) for r in roles) + " |")
    lines += [
        "",
        f"Keeps {s['accuracy_retention']:.1%} of the teacher's accuracy and agrees with it on "
        f"{s['agreement_with_teacher']:.1%} of test rows, with {s['compression_ratio']:.1f}x fewer parameters "
        f"and {s['speedup']:.1f}x lower batch-of-1 latency.",
        "",
        "## Gates",
    ]
    if gates:
        lines += ["", "| gate | value | threshold | result |", "| --- | --- | --- | --- |"]
        for g in gates:
            value = "n/a" if g["value"] is None else f"{g['value']:.6g}"
            result = ("pass" if g["passed"] else "**FAIL**") + (f" ({g['note']})" if g.get("note") else "")
            lines.append(f"| `{g['gate']}` | {value} | {g['op']} {g['threshold']:.6g} | {result} |")
    else:
        lines.append("No gates configured.")
    if promoted is not None:
        lines += ["", "Promoted to `champion`." if promoted else "Not promoted: `champion` unchanged."]
    lines += ["", f"Training run: `{run_id}` (figures under `plots/` in its parent run)."]
    return "\n".join(lines) + "\n"
