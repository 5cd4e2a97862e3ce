"""A monitored model's Evidently project: every judged window's snapshots, stamped with what they
judged, and a dashboard over them that kd-ops creates and keeps.

Why here and not in a notebook: a user who opens `evidently ui` after a week of traffic should see
the drift arrive and the re-distilled version take over, without writing a panel. The snapshots
alone do not do it (Evidently's UI says "This dashboard is currently empty" until a project has
panels), nor do they say which window, version or verdict they belong to unless stamped.

Each judged window adds to the project "kd-ops <model name>":

  drift    Evidently's drift report (`monitors.signals.drift_report`): DriftedColumnsCount,
           ValueDrift of the predicted class (PSI) and of the confidence (K-S p-value), per column
  quality  Evidently's ClassificationPreset on the rows whose labels arrived (when enough did)
  summary  the monitor's own numbers as Evidently metrics (`summary_snapshot`): MeanValue over
           one column per estimate, whose per-row values average to exactly the monitor's figure:
           accuracy on labelled rows, the confidence-based estimate (ATC), agreement with the
           shadow teacher, mean confidence, per-slice accuracy, the served version and the
           verdict as a number (0 ok, 1 warn, 2 alert); RowCount for the rows

and `stamp` gives each one the window's newest prediction time as its timestamp (the dashboard's
time axis is traffic time, not the time the monitor ran), tags (`kd-ops`, its kind, the verdict,
`v<version>`) and metadata (model, version, window start and end, rows, labelled rows, verdict,
reasons, the MLflow run). The panels (`panels`) select snapshots by tag and metrics by type and
label, the way Evidently's own dashboards do; `ensure_dashboard` adds what is missing and leaves
the rest (a user's own panels, tabs, a panel's extra series) alone, so it runs on every window.

`monitor.workspace` is a folder (Evidently's local `Workspace`) or the URL of an Evidently UI
server (`RemoteWorkspace`); `monitor.workspace_url` is where users open the UI, for links.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from kd_ops.config.monitoring import MonitorConfig
from kd_ops.evaluation.reference import Reference
from monitors.decision import MonitorResult
from monitors.signals import confidence_hits, output_columns
from monitors.window import Window

log = logging.getLogger(__name__)

TAB = "kd-ops monitor"
TAG = "kd-ops"
VERDICT_CODES = {"ok": 0, "warn": 1, "alert": 2}

# The summary snapshot's columns (its own dataset: no user column can collide with them)
ACCURACY = "accuracy (labelled rows)"
ESTIMATED = "estimated accuracy (confidence, ATC)"
AGREEMENT = "agreement with the shadow teacher"
CONFIDENCE = "mean confidence"
VERSION = "served version"
VERDICT = "verdict"
SLICE_PREFIX = "slice accuracy "


def project_name(model_name: str) -> str:
    return f"kd-ops {model_name}"


def slice_column(name: str, level: str) -> str:
    return f"{SLICE_PREFIX}{name}={level}"


# -- snapshots --------------------------------------------------------------------------------------
def summary_snapshot(window: Window, reference: Reference, result: MonitorResult) -> Any:
    """The monitor's estimates of one window as Evidently metrics.

    Each estimate is a column whose mean is the monitor's figure: 1/0 per labelled row for accuracy
    (NaN where no label arrived: MeanValue skips it), each row's share in the ATC estimate, 1/0 per
    shadow-scored row for agreement. A figure the monitor did not judge (too few labelled or shadow
    rows, a slice under `min_slice_rows`) is left out rather than plotted from too few rows."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue, RowCount

    metrics = result.metrics
    columns: dict[str, np.ndarray] = {
        ESTIMATED: confidence_hits(reference, window.confidence),
        CONFIDENCE: np.asarray(window.confidence, dtype=np.float64),
        VERSION: np.full(window.rows, _version_number(window.model_version)),
        VERDICT: np.full(window.rows, float(VERDICT_CODES.get(result.status, np.nan))),
    }
    if "agreement_with_teacher" in metrics:
        shadowed = np.isfinite(window.teacher_class)
        agrees = window.predicted == np.nan_to_num(window.teacher_class, nan=-1)
        columns[AGREEMENT] = np.where(shadowed, agrees, np.nan).astype(np.float64)
    # Accuracy is over the rows whose labels arrived: the window's, or those of the longer
    # feedback window (`monitor.label_window_rows`), NaN-padded to one length (MeanValue skips NaN).
    view = window.labelled
    labelled = np.isfinite(view.labels)
    correct = np.where(labelled, view.predicted == np.nan_to_num(view.labels, nan=-1), np.nan)
    judged: dict[str, np.ndarray] = {}
    if "accuracy" in metrics:
        judged[ACCURACY] = correct.astype(np.float64)
    for name, values in view.slices.items():
        for level in sorted(set(values[labelled]) - {""}):
            if f"accuracy_slice_{name}_{level}" in metrics:
                judged[slice_column(name, level)] = np.where(values == level, correct, np.nan).astype(np.float64)
    n = max(window.rows, view.rows)
    columns = {k: _padded(v, n) for k, v in {**columns, **judged}.items()}
    frame = pd.DataFrame(columns)
    data = Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(columns)))
    return Report([RowCount(), *(MeanValue(column=c) for c in columns)]).run(data, None)


def _padded(values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    out[: len(values)] = values
    return out


def _version_number(version: str) -> float:
    try:
        return float(int(version))
    except (TypeError, ValueError):  # a registry whose versions are not numbers: no version line
        return float("nan")


def stamp(snapshot: Any, result: MonitorResult, kind: str) -> Any:
    """`snapshot` with the window's time, tags and metadata (Evidently's own snapshot model: a
    snapshot's metadata is fixed when its report runs, before the verdict is known)."""
    from evidently.core.report import Snapshot

    window = result.window
    model = snapshot.to_snapshot_model()
    model.name = f"{kind}: {result.model_name} v{result.model_version}, {window.get('last') or 'window'}"
    if window.get("last"):
        model.timestamp = _naive_utc(str(window["last"]))
    model.tags = [TAG, kind, result.status, f"v{result.model_version}"]
    reasons = "; ".join(r.message for r in result.reasons)
    model.metadata = {
        "model": result.model_name,
        "model_version": str(result.model_version),
        "window_start": str(window.get("first") or ""),
        "window_end": str(window.get("last") or ""),
        "rows": str(window.get("rows", "")),
        "labelled_rows": str(window.get("labelled_rows", "")),
        "verdict": result.status,
        "reasons": reasons or "none",
        **({"mlflow_run_id": result.run_id} if result.run_id else {}),
    }
    return Snapshot.load_model(model)


def _naive_utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


# -- the dashboard ------------------------------------------------------------------------------------
def panels(result: MonitorResult, schema: Any | None) -> list[Any]:
    """The dashboard's panels for a model (a table model's prediction columns may be renamed, see
    `output_columns`); the per-slice panel holds a line per slice this window judged."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel

    predicted, confidence = output_columns(schema)

    def summary(column: str, legend: str | None = None) -> PanelMetric:
        return PanelMetric(
            legend=legend or column, metric="MeanValue", metric_labels={"column": column}, tags=[TAG, "summary"]
        )

    def drift(metric: str, legend: str, **labels: str) -> PanelMetric:
        return PanelMetric(legend=legend, metric=metric, metric_labels=labels, tags=[TAG, "drift"])

    # A line per slice the summary snapshot holds (so per slice this window judged).
    snapshot = result.snapshots.get("summary")
    slice_lines = [
        summary(m["config"]["column"])
        for m in (snapshot.dict()["metrics"] if snapshot is not None else [])
        if m["config"].get("column", "").startswith(SLICE_PREFIX)
    ]
    return [
        counter_panel(
            "Served version",
            [summary(VERSION, "version")],
            "the registered version that served the newest window",
            size="half",
        ),
        counter_panel(
            "Rows in the newest window",
            [PanelMetric(legend="rows", metric="RowCount", tags=[TAG, "summary"])],
            size="half",
        ),
        bar_plot_panel(
            "Verdict per window",
            [summary(VERDICT, "0 ok, 1 warn, 2 alert")],
            "the monitor's decision; the reasons are in each report's metadata",
        ),
        line_plot_panel(
            "Accuracy: labelled rows and label-free estimates",
            [summary(ACCURACY), summary(ESTIMATED), summary(AGREEMENT), summary(CONFIDENCE)],
            "accuracy only where feedback labels arrived; the estimates on every row",
        ),
        line_plot_panel(
            "Input drift: share of drifted columns",
            [drift("DriftedColumnsCount", "share of drifted columns", value_type="share")],
            size="half",
        ),
        line_plot_panel(
            "Input drift: drifted columns",
            [drift("DriftedColumnsCount", "drifted columns", value_type="count")],
            size="half",
        ),
        line_plot_panel(
            "Predicted-class drift (PSI)",
            [drift("ValueDrift", "PSI of the predicted class", column=predicted)],
            "above 0.1: the mix of answers changed",
            size="half",
        ),
        line_plot_panel(
            "Confidence drift (K-S p-value)",
            [drift("ValueDrift", "p-value of the confidence", column=confidence)],
            "near 0: the confidence distribution moved",
            size="half",
        ),
        line_plot_panel(
            "Accuracy per slice (labelled rows)",
            slice_lines,
            "each slice on its own rows; a slice appears once enough of its rows are labelled",
        ),
    ]


def ensure_dashboard(workspace: Any, project_id: Any, wanted: list[Any]) -> bool:
    """Add to the project's dashboard the kd-ops tab, the wanted panels it lacks, and the series a
    kept panel lacks (a new slice); leave everything else as it is. True if it changed."""
    from evidently.sdk.models import DashboardTabModel

    model = workspace.get_dashboard(project_id)
    tab = next((t for t in model.tabs if t.title == TAB), None)
    changed = tab is None
    if tab is None:
        tab = DashboardTabModel(title=TAB, panels=[])
        model.tabs.insert(0, tab)
    kept = {p.title: p for p in model.panels if p.id in tab.panels}
    for panel in wanted:
        have = kept.get(panel.title)
        if have is None:
            model.panels.append(panel)
            tab.panels.append(panel.id)
            changed = True
            continue
        known = {_series_key(v) for v in have.values}
        new = [v for v in panel.values if _series_key(v) not in known]
        if new:
            have.values.extend(new)
            changed = True
    if changed:
        workspace.save_dashboard(project_id, model)
    return changed


def _series_key(value: Any) -> tuple:
    return value.metric, tuple(sorted(value.metric_labels.items())), tuple(sorted(value.tags))


# -- the workspace --------------------------------------------------------------------------------------
@dataclass
class Published:
    project_id: str
    snapshots: dict[str, str]  # kind -> snapshot id
    links: dict[str, str]  # kind -> URL in the Evidently UI ("" when it cannot be known)
    dashboard: str  # URL of the project's dashboard

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _is_server(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def open_workspace(location: str) -> Any:
    """Evidently's local workspace at a path, or the Evidently UI server at an http(s) URL."""
    from evidently.ui.workspace import RemoteWorkspace, Workspace

    if _is_server(location):
        return RemoteWorkspace(location)
    return Workspace.create(location)


def publish(result: MonitorResult, cfg: MonitorConfig, schema: Any | None = None) -> Published | None:
    """The window's snapshots (stamped already, see `stamp`) into the model's project, and its
    dashboard kept."""
    if not cfg.workspace or not result.snapshots:
        return None
    ws = open_workspace(cfg.workspace)
    name = project_name(result.model_name)
    project = next((p for p in ws.list_projects() if p.name == name), None)
    if project is None:
        project = ws.create_project(
            name, description=f"kd-ops monitor windows of the registered model {result.model_name}"
        )
    ensure_dashboard(ws, project.id, panels(result, schema))
    ui = cfg.workspace if _is_server(cfg.workspace) else cfg.workspace_url
    base = (ui or "").rstrip("/")
    ids, links = {}, {}
    for kind, snapshot in result.snapshots.items():
        ref = ws.add_run(project.id, snapshot)
        ids[kind] = str(ref.id)
        links[kind] = f"{base}/projects/{project.id}/reports/{ref.id}" if base else ""
    dashboard = f"{base}/projects/{project.id}" if base else ""
    return Published(str(project.id), ids, links, dashboard)
