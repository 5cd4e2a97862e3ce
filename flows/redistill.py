"""The redistill flow: the teacher labels recent production inputs, a new student is distilled
on them plus the training data, gated against the champion, and promoted or not, with the reason.

At most one per model: the deployment allows one run at a time (a second is cancelled, see
`flows.deploy`), and a run that starts within `redistill.cooldown_minutes` of the last
re-distillation of the same model ends at once, saying so.

Training and deciding are two tasks: `train_candidate` registers the new student once under the
run's key (the triggering event's id, else the flow run's), `decide` reads everything back from
the registry. A failure after registration retries the decision, never the training, and a
rerun of the same event finds its candidate."""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import RETRIES, RETRY_DELAYS, config, retry_if_transient
from flows.reporting import redistill_artifacts, redistill_run_name, rename, run_logs


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def recent_redistillation(config_path: str, overrides: list[str], key: str) -> str | None:
    from kd_ops.pipeline.redistill import last_redistillation

    cfg = config(config_path, overrides)
    return last_redistillation(cfg, key)


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def train_candidate(config_path: str, overrides: list[str], trigger: str, key: str) -> dict[str, Any]:
    """Distil and register the candidate; a retry (or a rerun under the same key) finds the
    version it registered and trains nothing again."""
    from kd_ops.pipeline.redistill import train_candidate as train

    return train(config(config_path, overrides), trigger=trigger, key=key).to_json()


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def decide(config_path: str, overrides: list[str], candidate: dict[str, Any]) -> dict[str, Any]:
    """Gates against the champion, then promotion: read back from the registry, so a retry
    repeats only the decision."""
    from kd_ops.pipeline.redistill import Candidate
    from kd_ops.pipeline.redistill import decide as judge

    return judge(config(config_path, overrides), Candidate(**candidate)).to_json()


def run_key(trigger_key: str | None) -> str:
    """What a re-distillation is keyed by: the triggering event's id (the automation passes it),
    else this flow run's id, which a flow retry keeps."""
    if trigger_key:
        return trigger_key
    from prefect.runtime import flow_run

    return f"flow-run-{flow_run.id}" if flow_run.id else f"local-{uuid.uuid4().hex}"


@flow(name="kd-ops-redistill", flow_run_name=redistill_run_name, log_prints=True)
def redistill_flow(
    config_path: str,
    overrides: list[str] | None = None,
    trigger: str = "manual",
    ignore_cooldown: bool = False,
    trigger_key: str | None = None,
) -> dict[str, Any]:
    """Re-distil the config's model on recent traffic; the result says promoted or kept, and why."""
    overrides = list(overrides or [])
    with run_logs():
        logger = get_run_logger()
        out: dict[str, Any] | None = None
        key = run_key(trigger_key)
        if not ignore_cooldown:
            recent = recent_redistillation(config_path, overrides, key)
            if recent:
                logger.info("skipped: %s", recent)
                out = {"skipped": True, "reason": recent, "promoted": False}
        if out is None:
            candidate = train_candidate(config_path, overrides, trigger, key)
            if candidate["reused"]:
                logger.info("v%s was registered under %s already: deciding, not training", candidate["version"], key)
            out = decide(config_path, overrides, candidate)
            logger.info(out["reason"])
        rename(redistill_artifacts(config(config_path, overrides), out, trigger))
    return out
