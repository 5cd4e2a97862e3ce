"""`kd-ops deploy CONFIG`: the loop's deployments, served by this process (no work pool needed).

  <model>  of kd-ops-monitor     the monitor, on `monitor.cron` or every `monitor.interval_minutes`
  <model>  of kd-ops-redistill   on `redistill.cron` (weekly by default) and, with
                                 `redistill.on_alert`, on every `kd-ops.monitor.alert` event of this
                                 model; alerts within `redistill.cooldown_minutes` of the one that
                                 started a run start nothing (the trigger's `within`), and a run
                                 that finds one already going is cancelled (concurrency 1, CANCEL_NEW)

For a work pool (process, Docker, Kubernetes) the same deployments are in `prefect.yaml`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from flows.common import config
from flows.monitor import ALERT_EVENT, model_resource
from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.errors import ConfigError


def _schedules(
    key: str, cron: str | None, interval_minutes: float | None = None, parameters: dict[str, Any] | None = None
) -> list[Any]:
    """The deployment's schedule; `parameters` are what its runs get on top (why they ran)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron, Interval

    if cron:
        try:
            CronSchedule(cron=cron)
        except ValueError as exc:
            raise ConfigError(f"{key} = {cron!r}: {str(exc).splitlines()[-1].strip()}") from None
        return [Cron(cron, timezone="UTC", parameters=parameters or {})]
    if interval_minutes:
        return [Interval(dt.timedelta(minutes=interval_minutes), parameters=parameters or {})]
    return []


def alert_trigger(cfg: ExperimentConfig, parameters: dict[str, Any]) -> Any:
    """The drift event of this model -> a redistill run, at most one per cooldown."""
    from prefect.events import DeploymentEventTrigger

    cooldown = dt.timedelta(minutes=cfg.redistill.cooldown_minutes)
    return DeploymentEventTrigger(
        name=f"redistill {cfg.registry.name} on drift",
        expect={ALERT_EVENT},
        match={"prefect.resource.id": model_resource(cfg.registry.name)},
        for_each={"prefect.resource.id"},
        threshold=1,
        within=cooldown,
        parameters={
            **parameters,
            "trigger": "drift alert on v{{ event.resource['kd-ops.model.version'] }}: {{ event.payload.summary }}",
            # one re-distillation per alert: a retried or re-run flow finds the candidate it registered
            "trigger_key": "event-{{ event.id }}",
        },
    )


def deployments(config_path: str, overrides: list[str] | None = None) -> list[Any]:
    """The monitor and redistill deployments of one experiment config, named after its model."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    from flows.monitor import monitor_flow
    from flows.redistill import redistill_flow

    cfg = config(config_path, overrides)
    name = cfg.registry.name
    parameters = {"config_path": str(Path(config_path).resolve()), "overrides": list(overrides or [])}
    tags = ["kd-ops", name]
    monitor = monitor_flow.to_deployment(
        name=name,
        parameters=parameters,
        tags=tags,
        description=f"judge the latest window of {name}'s prediction log; emit {ALERT_EVENT} on alert",
        schedules=_schedules("monitor.cron", cfg.monitor.cron, cfg.monitor.interval_minutes),
        # After downtime, one monitor of the newest window, not a burst of stale ones.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="CANCEL_NEW"),
    )
    redistill = redistill_flow.to_deployment(
        name=name,
        parameters=parameters,
        tags=tags,
        description=f"re-distil {name} on teacher-labelled recent traffic; promote if it beats the champion",
        triggers=[alert_trigger(cfg, parameters)] if cfg.redistill.on_alert else [],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="CANCEL_NEW"),
        schedules=_schedules(
            "redistill.cron", cfg.redistill.cron, parameters={"trigger": f"schedule {cfg.redistill.cron}"}
        ),
    )
    return [monitor, redistill]


def check_api() -> str:
    """The Prefect API `kd-ops deploy` registers with. Without one, `prefect.serve` would start a
    temporary server that runs no scheduler: the deployments would exist and never run."""
    import requests
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set: start a server (`prefect server start --host 127.0.0.1`) and"
            " export PREFECT_API_URL=http://127.0.0.1:4200/api, or log in to Prefect Cloud"
        )
    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        raise ConfigError(f"PREFECT_API_URL = {url}: the Prefect API does not answer ({type(exc).__name__})") from None
    return url


def serve(config_path: str, overrides: list[str] | None = None) -> None:
    """Serve the deployments until SIGINT or SIGTERM. Deployments stay active while no one serves
    them, so runs due in the meantime wait for the next `kd-ops deploy` instead of being lost."""
    import prefect

    prefect.serve(*deployments(config_path, overrides), pause_on_shutdown=False, print_starting_message=False)
