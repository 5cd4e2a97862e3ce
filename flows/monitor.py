"""The monitor flow: judge the latest window of the prediction log, send alert hooks, and on
`alert` emit a Prefect event that the redistill deployment is triggered by."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import RETRIES, RETRY_DELAYS, config, retry_if_transient
from flows.reporting import monitor_artifacts, monitor_run_name, rename, run_logs

ALERT_EVENT = "kd-ops.monitor.alert"


def model_resource(name: str) -> str:
    """The Prefect resource id of a registered model: triggers match on it."""
    return f"kd-ops.model.{name}"


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def judge_window(config_path: str, overrides: list[str]) -> dict[str, Any]:
    from monitors.monitor import run_monitor

    return run_monitor(config(config_path, overrides)).to_json()


def emit_alert(result: dict[str, Any]) -> str | None:
    """The drift event: model name and version as the resource, the reasons as the payload."""
    from prefect.events import emit_event

    event = emit_event(
        event=ALERT_EVENT,
        resource={
            "prefect.resource.id": model_resource(result["model_name"]),
            "prefect.resource.name": result["model_name"],
            "kd-ops.model.version": str(result["model_version"]),
        },
        payload={
            "status": result["status"],
            "reasons": result["reasons"],
            "summary": "; ".join(r["message"] for r in result["reasons"] if r["status"] == "alert"),
            "monitor_run_id": result.get("run_id"),
        },
    )
    return None if event is None else str(event.id)


@flow(name="kd-ops-monitor", flow_run_name=monitor_run_name, log_prints=True)
def monitor_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """One monitor pass; returns the verdict (status, reasons, metrics)."""
    overrides = list(overrides or [])
    with run_logs():
        result = judge_window(config_path, overrides)
        logger = get_run_logger()
        logger.info("%s v%s: %s", result["model_name"], result["model_version"], result["status"])
        for reason in result["reasons"]:
            logger.info("  %s: %s", reason["status"], reason["message"])
        if result["status"] == "alert":
            result["event_id"] = emit_alert(result)
            if result["event_id"]:
                logger.info("emitted %s (event %s)", ALERT_EVENT, result["event_id"])
            else:
                logger.warning("events are off in this Prefect setup: %s not emitted, no re-distillation", ALERT_EVENT)
        rename(monitor_artifacts(config(config_path, overrides), result))
    return result
