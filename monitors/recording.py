"""A verdict into MLflow (metrics, the Evidently reports) and into the Evidently workspace."""

from __future__ import annotations

import tempfile
from pathlib import Path

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


def _record(result: MonitorResult, cfg: ExperimentConfig) -> None:
    """The verdict and the Evidently report into an MLflow run, and the report into the workspace."""
    import mlflow

    from kd_ops.registry.tracking import use_experiment

    experiment_id = use_experiment(cfg.tracking.uri, f"{cfg.tracking.experiment}-monitor")
    tags = {
        "kd_ops.role": "monitor",
        "kd_ops.monitor.model": result.model_name,
        "kd_ops.monitor.model_version": result.model_version,
        "kd_ops.monitor.status": result.status,
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-v{result.model_version}", tags=tags) as run:
        mlflow.log_metrics(metric_names(result.metrics))
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
