"""Promotion gates: what a new student must show before it may become `champion`.

A gate is `min_<metric>` or `max_<metric>` with a threshold, read against the student's test
metrics. One gate is not a plain metric: `max_slice_drop_vs_champion` scores the current
champion on the challenger's own test rows and takes the largest per-slice accuracy drop, so a
student that is better on average but worse on one class or one kind of input does not slip
through. Every decision (gate, value, threshold, pass/fail) is kept: as `gates.json` in the run
and as tags on the model version, so the registry says why a version was or was not promoted.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Gates that are not a logged metric, with the only direction that makes sense for each.
SPECIAL_GATES = {"slice_drop_vs_champion": "max"}
TAG_GATES = "kd_ops.gates"  # "passed" | "failed"
TAG_GATE_PREFIX = "kd_ops.gate."


@dataclass
class GateDecision:
    gate: str
    metric: str
    op: str  # ">=" or "<="
    value: float | None
    threshold: float
    passed: bool
    note: str = ""

    def tag_value(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.6g}"
        verdict = "pass" if self.passed else "FAIL"
        return f"{verdict}: {shown} {self.op} {self.threshold:.6g}" + (f" ({self.note})" if self.note else "")


def check(
    gates: dict[str, float], metrics: dict[str, float], specials: dict[str, tuple[float | None, str]]
) -> list[GateDecision]:
    """Decide every gate; a metric that is missing or not a number fails its gate (and says so)."""
    decisions = []
    for gate, threshold in gates.items():
        op, metric = gate[:3], gate[4:]
        if metric in specials:
            value, note = specials[metric]
        else:
            value, note = metrics.get(metric), ""
            if value is None:
                note = "metric not produced by this evaluation"
        cmp = ">=" if op == "min" else "<="
        if value is None or math.isnan(value):
            passed = note.startswith("no champion")  # nothing to fall behind yet; anything else unknown fails
        else:
            passed = value >= threshold if op == "min" else value <= threshold
        decisions.append(GateDecision(gate, metric, cmp, value, float(threshold), bool(passed), note))
    return decisions


def slice_drop(challenger: dict[str, float], champion: dict[str, float]) -> tuple[float, str]:
    """Largest accuracy drop of any slice, champion minus challenger, on the same rows."""
    drops = {
        k.removeprefix("test_accuracy_slice_"): champion[k] - challenger[k]
        for k in challenger
        if k.startswith("test_accuracy_slice_") and k in champion
    }
    if not drops:
        return float("nan"), "no common slices"
    worst = max(drops, key=drops.get)
    return float(drops[worst]), f"worst slice {worst}"


def all_passed(decisions: list[GateDecision]) -> bool:
    return all(d.passed for d in decisions)


def as_json(decisions: list[GateDecision]) -> list[dict[str, Any]]:
    return [asdict(d) for d in decisions]


def log_decisions(decisions: list[GateDecision]) -> None:
    """One line per gate, a failed one as a warning: a flow's log then says why a version was or
    was not promoted without opening the registry."""
    for d in decisions:
        shown = "n/a" if d.value is None else f"{d.value:.4g}"
        note = f" ({d.note})" if d.note else ""
        level = logging.INFO if d.passed else logging.WARNING
        verdict = "passed" if d.passed else "FAILED"
        log.log(
            level, "gate %s %s: %s %s, threshold %s %.4g%s", d.gate, verdict, d.metric, shown, d.op, d.threshold, note
        )


def record(decisions: list[GateDecision], client: MlflowClient, run_id: str, name: str, version: str) -> None:
    """gates.json in the run; one tag per gate plus the verdict on the model version."""
    verdict = "passed" if all_passed(decisions) else "failed"
    client.log_text(run_id, json.dumps({"verdict": verdict, "gates": as_json(decisions)}, indent=2), "gates.json")
    client.set_tag(run_id, TAG_GATES, verdict)
    for d in decisions:
        client.set_model_version_tag(name, version, TAG_GATE_PREFIX + d.gate, d.tag_value())
    client.set_model_version_tag(name, version, TAG_GATES, verdict)
