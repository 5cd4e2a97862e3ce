"""The sweep flow: a grid of distillations as parallel Prefect tasks on a Dask cluster
(prefect-dask), each an MLflow run nested under one sweep run, ranked at the end.

Cells never promote (`registry.promote=false`): a sweep explores; promote the winner with
`kd-ops promote NAME VERSION` once its gates are what you want.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import RETRIES, RETRY_DELAYS, config, retry_if_transient

COLUMNS = ("test_accuracy", "accuracy_retention", "agreement_with_teacher", "test_ece", "latency_ms_p95")


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def distill_cell(
    config_path: str, overrides: list[str], cell: dict[str, Any], parent_run_id: str, threads: int
) -> dict:
    import torch

    from kd_ops.pipeline.distillation import run_distillation
    from kd_ops.pipeline.sweep import as_overrides

    torch.set_num_threads(threads)  # cells share the machine's cores
    cfg = config(config_path, [*overrides, *as_overrides(cell), "registry.promote=false"])
    tags = {"mlflow.parentRunId": parent_run_id, "kd_ops.sweep": parent_run_id}
    result = run_distillation(cfg, tags=tags)
    return {
        "cell": cell,
        "metrics": result.metrics["student"],
        "run_id": result.runs["parent"],
        "version": result.registered["version"],
    }


@flow(name="kd-ops-sweep", log_prints=True)
def sweep_flow(
    config_path: str,
    grid: dict[str, list[Any]],
    overrides: list[str] | None = None,
    metric: str = "test_accuracy",
    workers: int = 2,
) -> dict[str, Any]:
    """Every cell of `grid` distilled in parallel; the cells ranked by the student's `metric`."""
    from mlflow.tracking import MlflowClient

    from kd_ops.pipeline.sweep import cells, rank, table
    from kd_ops.registry.tracking import TAG_ROLE, use_experiment

    overrides = list(overrides or [])
    cfg = config(config_path, overrides)
    todo = cells(grid)
    client = MlflowClient(cfg.tracking.uri)
    experiment_id = use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    parent = client.create_run(
        experiment_id, run_name=f"sweep-{len(todo)}-cells", tags={TAG_ROLE: "sweep", "kd_ops.sweep.metric": metric}
    )
    parent_id = parent.info.run_id
    client.log_dict(parent_id, {"grid": grid, "overrides": overrides}, "sweep_grid.json")
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    futures = [distill_cell.submit(config_path, overrides, c, parent_id, threads) for c in todo]
    results = []
    for cell, future in zip(todo, futures):
        out = future.result(raise_on_failure=False)
        if isinstance(out, BaseException):
            results.append({"cell": cell, "error": str(out).splitlines()[0][:200] if str(out) else type(out).__name__})
        else:
            results.append(out)
    lower_is_better = ("latency", "test_ece", "test_nll", "param_count", "model_size", "peak_memory")
    ranked = rank(results, metric, higher_is_better=not metric.startswith(lower_is_better))
    md = table(ranked, metric, COLUMNS)
    client.log_text(parent_id, md, "sweep.md")
    client.log_text(parent_id, json.dumps(ranked, indent=1, default=str), "sweep.json")
    best = ranked[0] if ranked and "metrics" in ranked[0] else None
    if best is not None:
        client.log_metric(parent_id, f"best_{metric}", best["metrics"][metric])
        client.set_tag(parent_id, "kd_ops.sweep.best_run", best["run_id"])
    failed = sum("error" in r for r in results)
    client.set_terminated(parent_id, "FINISHED" if not failed else "FAILED")
    get_run_logger().info("sweep of %d cells (%d failed), ranked by %s:\n%s", len(todo), failed, metric, md)
    return {"parent_run_id": parent_id, "metric": metric, "ranked": ranked, "table": md, "failed": failed}


def run_sweep(
    config_path: str, grid: dict[str, list[Any]], overrides: list[str], metric: str, workers: int
) -> dict[str, Any]:
    """The sweep on a local Dask cluster of `workers` processes (one Prefect task per cell).

    Without a Prefect API, one temporary server is started here and handed to the workers:
    otherwise each worker process would start its own and the flow run would not see its tasks."""
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )
    sweep = sweep_flow.with_options(task_runner=runner)
    from prefect.settings import temporary_settings

    url, server = PREFECT_API_URL.value(), None
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=120)
        url = server.api_url
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # the Dask workers inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return sweep(config_path, grid, overrides, metric, workers)
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if server is not None:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # the flow's last logs and events reach the server before it stops
            EventsWorker.drain_all(timeout=10)
            server.stop()
