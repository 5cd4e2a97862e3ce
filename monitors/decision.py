"""From signals to a verdict: ok, warn or alert, with the reasons and what was not significant."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kd_ops.config.monitoring import MonitorConfig, Threshold
from kd_ops.evaluation.reference import Reference
from monitors.alerts import Alert, Reason
from monitors.signals import drift_report, label_free_metrics, quality_metrics, truncated_metrics, unseen_metrics
from monitors.window import Window


@dataclass
class MonitorResult:
    model_name: str
    model_version: str
    status: str  # ok | warn | alert | insufficient
    reasons: list[Reason] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # signals not judged or not significant, and why
    window: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    # A table's input columns: {name: {kind, test, score, threshold, drifted, unseen_share}}, so a
    # reader sees which test judged each column and what it found (empty for array models)
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Evidently snapshots by name: "drift" (every window that is judged), "quality" (when enough
    # rows are labelled), "summary" (the monitor's estimates, for the dashboard)
    snapshots: dict[str, Any] = field(default_factory=dict, repr=False)
    # Where the window's reports went in the Evidently workspace: project id, snapshot ids and
    # links to them in the UI (`monitors.dashboard.Published`); empty when not recorded
    evidently: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "snapshots"}
        out["reasons"] = [asdict(r) for r in self.reasons]
        return out

    def alert(self) -> Alert:
        return Alert(self.model_name, self.model_version, self.status, tuple(self.reasons), window=self.window)


def decide(
    metrics: dict[str, float], cfg: MonitorConfig, columns: dict[str, list[str]] | None = None
) -> tuple[str, list[Reason], list[str]]:
    """Status, the reasons for it, and the crossings left out because they were not significant.

    `columns`: per signal, the input columns behind it (drifted columns, columns with unseen
    categories), named in its reason: an alert that says *which* columns is one a reader can act on."""
    columns = columns or {}
    reasons, notes = [], []
    for signal, threshold in cfg.thresholds:
        if signal not in metrics:
            continue
        value = metrics[signal]
        assert isinstance(threshold, Threshold)
        level = "alert" if value > threshold.alert else "warn" if value > threshold.warn else None
        if not level:
            continue
        limit = threshold.alert if level == "alert" else threshold.warn
        message = f"{signal} = {value:.3f} > {limit:g}"
        p_value = metrics.get(f"{signal}_p_value")
        if p_value is not None and p_value >= cfg.rate_p_value:
            notes.append(f"{message}, not significant: p = {p_value:.3g} >= rate_p_value {cfg.rate_p_value:g}")
            continue
        named = tuple(columns.get(signal, ()))
        if named:
            shown = ", ".join(named[:10]) + (f" and {len(named) - 10} more" if len(named) > 10 else "")
            message += f" ({'column' if len(named) == 1 else 'columns'}: {shown})"
        reasons.append(Reason(signal, level, round(value, 4), limit, message, named))
    status = "alert" if any(r.status == "alert" for r in reasons) else "warn" if reasons else "ok"
    return status, reasons, notes


def judge(window: Window, reference: Reference, cfg: MonitorConfig) -> MonitorResult:
    """Every signal of `window` against `reference`, and the verdict."""
    result = MonitorResult(window.model_name, window.model_version, "ok", window=window.describe())
    if window.rows < cfg.min_rows:
        result.status = "insufficient"
        result.skipped.append(f"window: {window.rows} rows < min_rows {cfg.min_rows}; no verdict")
        return result
    result.snapshots["drift"], drift, result.columns = drift_report(window, reference, cfg.drift_p_value)
    unseen, unseen_columns = unseen_metrics(window)
    for name in window.unseen:
        result.columns.setdefault(name, {})["unseen_share"] = unseen[f"unseen_category_share_{name}"]
    truncated = truncated_metrics(window)
    for name in window.truncated:
        result.columns.setdefault(name, {})["truncated_share"] = truncated[f"truncated_text_share_{name}"]
    quality_snapshot, quality, skipped_q = quality_metrics(window, reference, cfg)
    if quality_snapshot is not None:
        result.snapshots["quality"] = quality_snapshot
    free, skipped_f = label_free_metrics(window, reference, cfg)
    result.metrics = {**drift, **unseen, **truncated, **quality, **free}
    result.skipped += skipped_q + skipped_f
    result.skipped += [f"drift of column {n}: {c['note']}" for n, c in result.columns.items() if c.get("note")]
    named = {
        "drift_share": [n for n, c in result.columns.items() if c.get("drifted")],
        "unseen_category_share": unseen_columns,
        # the text columns: what a text model's embeddings mostly read
        "embedding_drift": [c.name for c in window.schema.columns if c.kind == "text"] if window.schema else [],
    }
    result.status, result.reasons, notes = decide(result.metrics, cfg, named)
    result.skipped += notes
    return result
