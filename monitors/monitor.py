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
  unseen categories tables: share of rows with a category the training split never held, and
                    per column (the reasons name the columns); not a test, a count
  embedding drift   tables with text: a classifier two-sample test on the served network's
                    embeddings (the input of its head) of window and reference rows
  truncated texts   the share of each text column's texts longer than its max_length; a count
A window with fewer than `min_rows` rows says so (status "insufficient") instead of guessing;
signals without enough rows (labels, a slice, shadow scores) are skipped and listed.

A table model's window is read with the served version's schema, which its reference carries (one
download per monitor run: the reference is needed anyway); only a reference stored before it did
makes the monitor load the model version to read the schema. Each column's drift is tested with
the test Evidently picks for its type (`monitors.signals`, table of tests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.evaluation.reference import load_reference
from monitors.dashboard import summary_snapshot
from monitors.decision import MonitorResult, judge
from monitors.recording import _record
from monitors.window import (
    Window,
    feedback_frame,
    holds_records,
    read_window,
    served_schema,
    served_version,
    window_from_frame,
)

log = logging.getLogger(__name__)


_EMBEDDERS: dict[tuple[str, str, str], Any] = {}


def _embedder(name: str, version: str, allow_pickle: bool) -> Any:
    """The served version's embedder (`kd_ops.models.embedding`), loaded once per process and
    version: a deployed monitor that runs every few minutes downloads the model once."""
    import mlflow

    key = (mlflow.get_tracking_uri(), name, version)
    if key not in _EMBEDDERS:
        from kd_ops.models.embedding import load_embedder

        _EMBEDDERS[key] = load_embedder(f"models:/{name}/{version}", allow_pickle=allow_pickle)
    return _EMBEDDERS[key]


def run_monitor(
    cfg: ExperimentConfig, window: Window | None = None, record: bool = True, notify: bool = True
) -> MonitorResult:
    """Read the window (unless given), judge it, record it in MLflow and Evidently, send alerts."""
    from kd_ops.registry.tracking import open_tracking
    from monitors.alerts import Dispatcher

    open_tracking(cfg.tracking.uri)
    m = cfg.monitor
    name = cfg.registry.name
    empty = MonitorResult(name, "", "insufficient", skipped=["window: no predictions in the log for this model"])
    if window is None:
        longer = None
        if m.label_window_rows and m.window_rows and m.window_minutes is None:
            # One read: the window is the newest `window_rows` of the longer stretch labels come from.
            longer = read_window(m.store, name, max(m.label_window_rows, m.window_rows))
            frame = longer.tail(m.window_rows).reset_index(drop=True)
        else:
            frame = read_window(m.store, name, m.window_rows, m.window_minutes)
        if frame.empty:
            return empty
        # The version that served the newest prediction is judged, against its own reference,
        # whose shapes, schema and slicer read the window: one download.
        version = served_version(frame)
        reference = load_reference(name, version, cfg.tracking.uri)
        schema = reference.schema
        if schema is None and holds_records(frame):
            schema = served_schema(name, version, allow_pickle=cfg.allow_pickle)
        shape, slicer = (reference.x.shape[1], reference.probabilities.shape[1]), reference.input_slicer()
        window = window_from_frame(frame, name, *shape, schema=schema, slicer=slicer)
        if m.embedding_drift and schema is not None and schema.has_text:
            window = dataclasses.replace(window, embed=_embedder(name, version, cfg.allow_pickle))
        if m.label_window_rows:
            if longer is None:  # a window by minutes (or the whole log): the labels' stretch is read by rows
                longer = read_window(m.store, name, max(m.label_window_rows, len(frame)))
            labelled = feedback_frame(longer, version)
            if not labelled.empty:
                window = dataclasses.replace(
                    window,
                    feedback=window_from_frame(labelled, name, *shape, schema=schema, slicer=slicer),
                )
    elif window.rows:
        reference = load_reference(name, window.model_version, cfg.tracking.uri)
    if window.rows == 0:
        return empty
    result = judge(window, reference, m)
    if result.snapshots:
        result.snapshots["summary"] = summary_snapshot(window, reference, result)
    if record:
        _record(result, cfg, window.schema)
    if notify and result.reasons and m.alerts.hooks:
        delivery = Dispatcher(m.alerts).dispatch(result.alert())
        result.window["alert_hooks"] = {
            "sent": delivery.sent,
            "failed": delivery.failed,
            "suppressed": delivery.suppressed,
        }
    described = result.window
    log.info(
        "monitor %s v%s: %s on %s rows (%s labelled, %s shadow-scored)%s",
        name,
        result.model_version,
        result.status,
        described.get("rows"),
        described.get("labelled_rows"),
        described.get("shadow_rows"),
        "".join(f"\n  {r.status}: {r.message}" for r in result.reasons),
    )
    log.debug("monitor %s v%s metrics: %s", name, result.model_version, json.dumps(result.metrics))
    return result
