"""Judge a window of the deployed student's traffic against its reference: ok, warn or alert, and why.

Signals, each compared with the reference stored when the student was distilled:
  data drift        share of input features whose distribution drifted (Evidently, per feature)
  prediction drift  of the predicted class (PSI) and of the confidence (K-S), Evidently ValueDrift
  slice drift       PSI of the share of traffic in each input slice (a slice that empties or swells)
  accuracy          Evidently's Accuracy on rows whose feedback label arrived, overall and per
                    slice; each slice is its own report on its own rows (Evidently's GroupBy
                    returns the overall value for every group with classification metrics).
                    A drop in accuracy, agreement or estimated accuracy must also be significant
                    (Fisher exact test against the reference at `rate_p_value`), in the warn band
                    as in the alert band: windows and references are small samples
  label-free        agreement with the shadow teacher where it scored, and accuracy estimated
                    from confidence by a threshold set on the reference (ATC)
A window with fewer than `min_rows` rows says so (status "insufficient") instead of guessing;
signals without enough rows (labels, a slice, shadow scores) are skipped and listed.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_ops.config import ExperimentConfig, MonitorConfig, Threshold
from kd_ops.reference import Reference, load_reference
from monitors.alerts import Alert, Reason
from monitors.window import Window, load_window

log = logging.getLogger(__name__)
PSI_THRESHOLD = 0.1  # Evidently's own drift flag for PSI (the decision uses monitor.thresholds)


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
    # Evidently snapshots by name: "drift" (every window that is judged), "quality" (when enough
    # rows are labelled)
    snapshots: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "snapshots"}
        out["reasons"] = [asdict(r) for r in self.reasons]
        return out

    def alert(self) -> Alert:
        return Alert(self.model_name, self.model_version, self.status, tuple(self.reasons), window=self.window)


# -- label-free estimates -----------------------------------------------------------------------
def confidence_estimate(reference: Reference, confidence: np.ndarray) -> float:
    """Accuracy of a window estimated from its confidences: Average Thresholded Confidence (Garg et
    al., ICLR 2022). On the reference, pick the confidence threshold above which the share of rows
    equals the reference accuracy; the window's estimate is its share of rows above it. Chosen
    over calibrating P(correct) on the reference (isotonic or temperature scaling, like NannyML's
    CBPE): a reference of a few hundred rows holds few errors to calibrate on, while a threshold
    needs only the accuracy, and it tracked the true accuracy best under every drift scenario
    (bench/monitor_quality.py)."""
    ref = np.sort(np.asarray(reference.confidence, dtype=np.float64))
    conf = np.asarray(confidence, dtype=np.float64)
    t = float(np.quantile(ref, 1.0 - reference.accuracy, method="lower"))
    # Saturated students give many equal confidences: rows exactly at the threshold count by the
    # fraction that makes the reference's own estimate equal its accuracy.
    above, at = float((ref > t).mean()), float((ref == t).mean())
    tie = min(max((reference.accuracy - above) / at, 0.0), 1.0) if at else 0.0
    return float((conf > t).mean() + tie * (conf == t).mean())


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean())


def drop_p_value(window_hits: np.ndarray, reference_hits: np.ndarray) -> float:
    """One-sided Fisher exact test that the window's rate (accuracy, agreement) is below the
    reference's. Both are samples, a hundred or a few hundred rows: a drop of a few points is often
    their noise, so a threshold alone cries wolf (bench/monitor_quality.py)."""
    from scipy.stats import fisher_exact

    w, r = int(np.sum(window_hits)), int(np.sum(reference_hits))
    table = [[w, len(window_hits) - w], [r, len(reference_hits) - r]]
    return float(fisher_exact(table, alternative="less").pvalue)


def estimate_drop_p_value(estimate: float, rows: int, reference: Reference) -> float:
    """The same one-sided Fisher test for the label-free estimate: ATC's estimate is the window's
    share of rows above the reference's confidence threshold, and above it the reference holds a
    share equal to its accuracy, so both sides are counts of rows above one threshold. A 1000-row
    window on clean traffic lands a point or two under the reference by chance."""
    n_ref = len(reference.confidence)
    window_hits = round(estimate * rows)
    reference_hits = round(reference.accuracy * n_ref)
    return drop_p_value(
        np.arange(rows) < window_hits,
        np.arange(n_ref) < reference_hits,
    )


def _classification(pred: np.ndarray, labels: np.ndarray) -> Any:
    from evidently import DataDefinition, Dataset, MulticlassClassification

    # Integer classes and no label map: Evidently 0.7.23 raises KeyError on a slice that lacks some
    # class when given string labels or a `labels` map.
    df = pd.DataFrame({"target": np.asarray(labels).astype(int), "prediction": np.asarray(pred).astype(int)})
    definition = DataDefinition(
        classification=[MulticlassClassification(target="target", prediction_labels="prediction")]
    )
    return Dataset.from_pandas(df, data_definition=definition)


def evidently_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy by Evidently's `Accuracy` metric, on exactly these rows (so a slice is its own report:
    `GroupBy` would return the overall value for every group)."""
    from evidently import Report
    from evidently.metrics import Accuracy

    with warnings.catch_warnings():  # a one-class slice makes scikit-learn warn about the matrix shape
        warnings.simplefilter("ignore")
        snapshot = Report([Accuracy()]).run(_classification(pred, labels), None)
    return float(snapshot.dict()["metrics"][0]["value"])


def quality_report(pred: np.ndarray, labels: np.ndarray, reference: Reference) -> tuple[Any, float]:
    """Evidently's ClassificationPreset on the labelled rows beside the reference (accuracy, F1,
    precision and recall by class, confusion matrix): the report a reader opens when accuracy
    alerts. Returns the snapshot and its accuracy."""
    from evidently import Report
    from evidently.presets import ClassificationPreset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([ClassificationPreset()]).run(
            _classification(pred, labels), _classification(reference.predicted, reference.labels)
        )
    accuracy = next(m["value"] for m in snapshot.dict()["metrics"] if m["config"]["type"].endswith(":Accuracy"))
    return snapshot, float(accuracy)


# -- Evidently ------------------------------------------------------------------------------------
def _frame(x: np.ndarray, probs: np.ndarray, slices: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    df["predicted"] = probs.argmax(axis=1).astype(str)
    df["confidence"] = probs.max(axis=1)
    for name, values in (slices or {}).items():
        df[f"slice_{name}"] = np.asarray(values, dtype=str)
    return df


def drift_report(window: Window, reference: Reference, p_value: float) -> tuple[Any, dict[str, float]]:
    """One Evidently report: per-feature drift and its share, predicted-class and confidence drift."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    features = [f"f{i}" for i in range(window.x.shape[1])]
    # Slices the server computed from the rows (ink): a slice that grows or shrinks is drift too,
    # the one a corruption of one slice only shows first (its rows leave the slice).
    shared = sorted(set(window.slices) & set(reference.slices))
    slice_cols = [f"slice_{n}" for n in shared]
    definition = DataDefinition(
        numerical_columns=[*features, "confidence"], categorical_columns=["predicted", *slice_cols]
    )
    cur_df = _frame(window.x, window.probabilities, {n: window.slices[n] for n in shared})
    ref_df = _frame(reference.x, reference.probabilities, {n: reference.slices[n] for n in shared})
    current = Dataset.from_pandas(cur_df, data_definition=definition)
    ref = Dataset.from_pandas(ref_df, data_definition=definition)
    # Tests named explicitly: Evidently's defaults switch to distances (not p-values) on large data.
    metrics = [
        DriftedColumnsCount(columns=features, num_method="ks", num_threshold=p_value),
        # Categorical shares by PSI, a distance: a goodness-of-fit test would treat the reference's
        # few hundred rows as the exact population and alarm on their sampling noise.
        ValueDrift(column="predicted", method="psi", threshold=PSI_THRESHOLD),
        ValueDrift(column="confidence", method="ks", threshold=p_value),
        *(ValueDrift(column=c, method="psi", threshold=PSI_THRESHOLD) for c in slice_cols),
        *(ValueDrift(column=f, method="ks", threshold=p_value) for f in features),
    ]
    with warnings.catch_warnings():  # constant pixels (image borders) make numpy warn inside the tests
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report(metrics).run(current, ref)
    values = [m["value"] for m in snapshot.dict()["metrics"]]
    out = {
        "drift_share": float(values[0]["share"]),
        "prediction_drift": float(values[1]),
        "confidence_drift": 1.0 - float(values[2]),
    }
    slice_psi = values[3 : 3 + len(slice_cols)]
    if slice_cols:
        out["slice_drift"] = float(max(slice_psi))
        out.update({f"slice_drift_psi_{c.removeprefix('slice_')}": float(v) for c, v in zip(slice_cols, slice_psi)})
    out.update({f"drift_p_value_{f}": float(v) for f, v in zip(features, values[3 + len(slice_cols) :])})
    return snapshot, out


def quality_metrics(
    window: Window, reference: Reference, cfg: MonitorConfig
) -> tuple[Any, dict[str, float], list[str]]:
    """Accuracy drop on labelled rows, overall (with Evidently's classification report) and per
    slice, each slice on its own rows. The snapshot is None when too few rows are labelled."""
    out: dict[str, float] = {}
    skipped: list[str] = []
    labelled = np.isfinite(window.labels)
    if labelled.sum() < cfg.min_labelled_rows:
        skipped.append(f"accuracy: {int(labelled.sum())} labelled rows < min_labelled_rows {cfg.min_labelled_rows}")
        return None, out, skipped
    pred, labels = window.predicted[labelled], window.labels[labelled].astype(int)
    snapshot, out["accuracy"] = quality_report(pred, labels, reference)
    out["accuracy_drop"] = reference.accuracy - out["accuracy"]
    reference_hits = reference.predicted == reference.labels
    out["accuracy_drop_p_value"] = drop_p_value(pred == labels, reference_hits)
    judged: list[tuple[float, float]] = []  # (drop, p-value) per slice
    for name, values in window.slices.items():
        ref_values = reference.slices.get(name)
        for level in sorted(set(values[labelled]) - {""}):
            rows = values[labelled] == level
            if rows.sum() < cfg.min_slice_rows:
                skipped.append(f"slice {name}={level}: {int(rows.sum())} labelled rows < min_slice_rows")
                continue
            acc = evidently_accuracy(pred[rows], labels[rows])
            out[f"accuracy_slice_{name}_{level}"] = acc
            if ref_values is not None and (ref_values == level).sum() >= cfg.min_slice_rows:
                in_ref = ref_values == level
                drop = _accuracy(reference.predicted[in_ref], reference.labels[in_ref]) - acc
                out[f"accuracy_drop_slice_{name}_{level}"] = drop
                judged.append((drop, drop_p_value(pred[rows] == labels[rows], reference_hits[in_ref])))
    if judged:
        # p-values Bonferroni-corrected over the slices compared (or some slice would always look
        # significant); the signal is the worst significant drop, else the worst drop.
        judged = [(drop, min(1.0, p * len(judged))) for drop, p in judged]
        significant = [j for j in judged if j[1] < cfg.rate_p_value]
        out["slice_accuracy_drop"], out["slice_accuracy_drop_p_value"] = max(significant or judged)
    return snapshot, out, skipped


def label_free_metrics(window: Window, reference: Reference, cfg: MonitorConfig) -> tuple[dict[str, float], list[str]]:
    out: dict[str, float] = {}
    skipped: list[str] = []
    out["estimated_accuracy"] = confidence_estimate(reference, window.confidence)
    out["estimated_accuracy_drop"] = reference.accuracy - out["estimated_accuracy"]
    out["estimated_accuracy_drop_p_value"] = estimate_drop_p_value(out["estimated_accuracy"], window.rows, reference)
    shadowed = np.isfinite(window.teacher_class)
    if reference.teacher_probabilities is None:
        skipped.append("agreement: the reference has no teacher probabilities")
    elif shadowed.sum() < cfg.min_labelled_rows:
        skipped.append(f"agreement: {int(shadowed.sum())} shadow-scored rows < min_labelled_rows")
    else:
        hits = window.predicted[shadowed] == window.teacher_class[shadowed]
        reference_hits = reference.predicted == reference.teacher_probabilities.argmax(axis=1)
        out["agreement_with_teacher"] = float(hits.mean())
        out["agreement_drop"] = float(reference_hits.mean()) - out["agreement_with_teacher"]
        out["agreement_drop_p_value"] = drop_p_value(hits, reference_hits)
    return out, skipped


def decide(metrics: dict[str, float], cfg: MonitorConfig) -> tuple[str, list[Reason], list[str]]:
    """Status, the reasons for it, and the crossings left out because they were not significant."""
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
        reasons.append(Reason(signal, level, round(value, 4), limit, message))
    status = "alert" if any(r.status == "alert" for r in reasons) else "warn" if reasons else "ok"
    return status, reasons, notes


def judge(window: Window, reference: Reference, cfg: MonitorConfig) -> MonitorResult:
    """Every signal of `window` against `reference`, and the verdict."""
    result = MonitorResult(window.model_name, window.model_version, "ok", window=window.describe())
    if window.rows < cfg.min_rows:
        result.status = "insufficient"
        result.skipped.append(f"window: {window.rows} rows < min_rows {cfg.min_rows}; no verdict")
        return result
    result.snapshots["drift"], drift = drift_report(window, reference, cfg.drift_p_value)
    quality_snapshot, quality, skipped_q = quality_metrics(window, reference, cfg)
    if quality_snapshot is not None:
        result.snapshots["quality"] = quality_snapshot
    free, skipped_f = label_free_metrics(window, reference, cfg)
    result.metrics = {**drift, **quality, **free}
    result.skipped += skipped_q + skipped_f
    result.status, result.reasons, notes = decide(result.metrics, cfg)
    result.skipped += notes
    return result


# -- a monitor run ------------------------------------------------------------------------------
def _record(result: MonitorResult, cfg: ExperimentConfig) -> None:
    """The verdict and the Evidently report into an MLflow run, and the report into the workspace."""
    import mlflow

    from kd_ops.tracking import use_experiment

    experiment_id = use_experiment(cfg.tracking.uri, f"{cfg.tracking.experiment}-monitor")
    tags = {
        "kd_ops.role": "monitor",
        "kd_ops.monitor.model": result.model_name,
        "kd_ops.monitor.model_version": result.model_version,
        "kd_ops.monitor.status": result.status,
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-v{result.model_version}", tags=tags) as run:
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
        mlflow.log_dict(result.to_json(), "monitor_result.json")
        if result.snapshots:
            with tempfile.TemporaryDirectory(prefix="kd-ops-monitor-") as tmp:
                for kind, snapshot in result.snapshots.items():
                    snapshot.save_html(str(Path(tmp) / f"{kind}.html"))
                    snapshot.save_json(str(Path(tmp) / f"{kind}.json"))
                mlflow.log_artifacts(tmp, "evidently")
        result.run_id = run.info.run_id
    if cfg.monitor.workspace and result.snapshots:
        from evidently.ui.workspace import Workspace

        ws = Workspace.create(cfg.monitor.workspace)
        name = f"kd-ops {result.model_name}"
        project = next((p for p in ws.list_projects() if p.name == name), None) or ws.create_project(name)
        for snapshot in result.snapshots.values():
            ws.add_run(project.id, snapshot)


def run_monitor(
    cfg: ExperimentConfig, window: Window | None = None, record: bool = True, notify: bool = True
) -> MonitorResult:
    """Read the window (unless given), judge it, record it in MLflow and Evidently, send alerts."""
    from kd_ops.served_model import resolve_alias
    from monitors.alerts import Dispatcher

    from kd_ops.tracking import open_tracking

    client = open_tracking(cfg.tracking.uri)
    m = cfg.monitor
    name = cfg.registry.name
    shape_ref, champion = None, None
    if window is None:
        # Shapes come from the champion's reference; the window then picks the version that served.
        champion = resolve_alias(client, name, "champion")
        shape_ref = load_reference(name, champion, cfg.tracking.uri)
        window = load_window(
            m.store, name, shape_ref.x.shape[1], shape_ref.probabilities.shape[1], m.window_rows, m.window_minutes
        )
    if window.rows == 0:
        return MonitorResult(name, "", "insufficient", skipped=["window: no predictions in the log for this model"])
    if shape_ref is not None and window.model_version == champion:
        reference = shape_ref  # the usual case: the champion served the window; download it once
    else:
        reference = load_reference(name, window.model_version, cfg.tracking.uri)
    result = judge(window, reference, m)
    if record:
        _record(result, cfg)
    if notify and result.reasons and m.alerts.hooks:
        delivery = Dispatcher(m.alerts).dispatch(result.alert())
        result.window["alert_hooks"] = {
            "sent": delivery.sent,
            "failed": delivery.failed,
            "suppressed": delivery.suppressed,
        }
    log.info("monitor %s v%s: %s %s", name, result.model_version, result.status, json.dumps(result.metrics))
    return result
