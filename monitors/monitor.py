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

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.evaluation.reference import load_reference
from monitors.decision import MonitorResult, judge
from monitors.recording import _record
from monitors.window import Window, load_window

log = logging.getLogger(__name__)


def run_monitor(
    cfg: ExperimentConfig, window: Window | None = None, record: bool = True, notify: bool = True
) -> MonitorResult:
    """Read the window (unless given), judge it, record it in MLflow and Evidently, send alerts."""
    from kd_ops.registry.tracking import open_tracking
    from kd_ops.serving.served_model import resolve_alias
    from monitors.alerts import Dispatcher

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
