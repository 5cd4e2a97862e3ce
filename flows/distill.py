"""The distill flow: data -> teacher -> cached soft targets -> student -> evaluate -> register ->
gates -> promote. Each stage is `kd_ops.pipeline.distillation`; here it is one task with retries."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import RETRIES, RETRY_DELAYS, config, retry_if_transient
from flows.reporting import distill_artifacts, distill_run_name, rename, run_logs


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def distill(config_path: str, overrides: list[str]) -> dict[str, Any]:
    from kd_ops.pipeline.distillation import run_distillation

    return run_distillation(config(config_path, overrides)).to_json()


@flow(name="kd-ops-distill", flow_run_name=distill_run_name, log_prints=True)
def distill_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Distil the config's student and register it; it becomes champion if its gates pass."""
    overrides = list(overrides or [])
    with run_logs():
        out = distill(config_path, overrides)
        reg = out["registered"]
        get_run_logger().info(
            "%s v%s: gates %s, promoted %s (champion v%s)",
            reg["name"],
            reg["version"],
            reg.get("gates"),
            reg.get("promoted"),
            reg.get("champion"),
        )
        rename(distill_artifacts(config(config_path, overrides), out))
    return out
