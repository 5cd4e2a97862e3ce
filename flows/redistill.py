"""The redistill flow: the teacher labels recent production inputs, a new student is distilled
on them plus the training data, gated against the champion, and promoted or not, with the reason.

At most one per model: the deployment allows one run at a time (a second is cancelled, see
`flows.deploy`), and a run that starts within `redistill.cooldown_minutes` of the last
re-distillation of the same model ends at once, saying so."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import RETRIES, RETRY_DELAYS, config, retry_if_transient
from flows.reporting import redistill_artifacts, redistill_run_name, rename, run_logs


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def recent_redistillation(config_path: str, overrides: list[str]) -> str | None:
    from kd_ops.pipeline.redistill import last_redistillation

    cfg = config(config_path, overrides)
    return last_redistillation(cfg)


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def redistill(config_path: str, overrides: list[str], trigger: str) -> dict[str, Any]:
    from kd_ops.pipeline.redistill import run_redistillation

    return run_redistillation(config(config_path, overrides), trigger=trigger).to_json()


@flow(name="kd-ops-redistill", flow_run_name=redistill_run_name, log_prints=True)
def redistill_flow(
    config_path: str, overrides: list[str] | None = None, trigger: str = "manual", ignore_cooldown: bool = False
) -> dict[str, Any]:
    """Re-distil the config's model on recent traffic; the result says promoted or kept, and why."""
    overrides = list(overrides or [])
    with run_logs():
        logger = get_run_logger()
        out: dict[str, Any] | None = None
        if not ignore_cooldown:
            recent = recent_redistillation(config_path, overrides)
            if recent:
                logger.info("skipped: %s", recent)
                out = {"skipped": True, "reason": recent, "promoted": False}
        if out is None:
            out = redistill(config_path, overrides, trigger)
            logger.info(out["reason"])
        rename(redistill_artifacts(config(config_path, overrides), out, trigger))
    return out
