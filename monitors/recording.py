"""A verdict into MLflow (metrics, the Evidently reports) and into the Evidently workspace."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from kd_ops.config.experiment import ExperimentConfig
from monitors.decision import MonitorResult


# -- a monitor run ------------------------------------------------------------------------------
def metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics under names MLflow accepts: a table's column and slice values are the user's text
    ("Credit card (automatic)"), and MLflow refuses a metric name with parentheses or a colon.
    Such characters become "_", as the evaluation's slice metrics name them (`metric_safe`); a
    name that then collides gets a numbered suffix. The monitor's own result (JSON, alerts) keeps
    the original names."""
    from kd_ops.evaluation.metrics import metric_safe

    out: dict[str, float] = {}
    for name, value in metrics.items():
        clean = metric_safe(name)[:250]
        key, n = clean, 1
        while key in out:
            n += 1
            key = f"{clean[:245]}_{n}"
        out[key] = float(value)
    return out


def _record(result: MonitorResult, cfg: ExperimentConfig, schema: Any | None = None) -> None:
    """The verdict and the Evidently reports into an MLflow run, and the reports into the
    Evidently workspace, whose dashboard is kept (`monitors.dashboard`). Every snapshot is stamped
    first, so the copy in MLflow and the one in the workspace carry the same time, tags and
    metadata."""
    import mlflow

    from kd_ops.registry.tracking import use_experiment
    from monitors.dashboard import publish, stamp

    experiment_id = use_experiment(cfg.tracking.uri, f"{cfg.tracking.experiment}-monitor")
    tags = {
        "kd_ops.role": "monitor",
        "kd_ops.monitor.model": result.model_name,
        "kd_ops.monitor.model_version": result.model_version,
        "kd_ops.monitor.status": result.status,
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-v{result.model_version}", tags=tags) as run:
        result.run_id = run.info.run_id
        result.snapshots = {kind: stamp(s, result, kind) for kind, s in result.snapshots.items()}
        mlflow.log_metrics(metric_names(result.metrics))
        if result.snapshots:
            with tempfile.TemporaryDirectory(prefix="kd-ops-monitor-") as tmp:
                for kind, snapshot in result.snapshots.items():
                    snapshot.save_html(str(Path(tmp) / f"{kind}.html"))
                    snapshot.save_json(str(Path(tmp) / f"{kind}.json"))
                mlflow.log_artifacts(tmp, "evidently")
        published = publish(result, cfg.monitor, schema)
        if published is not None:
            result.evidently = published.to_json()
            mlflow.set_tags(
                {"kd_ops.evidently.project": published.project_id}
                | ({"kd_ops.evidently.dashboard": published.dashboard} if published.dashboard else {})
            )
        mlflow.log_dict(result.to_json(), "monitor_result.json")
