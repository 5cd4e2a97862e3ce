"""The Prefect loop against Prefect's test harness (a real temporary Prefect server) and a real
MLflow: deployments and their schedules, the drift event -> automation -> redistill run, the
cooldown, a failing gate, and a transient tracking failure retried (a real `mlflow server` behind
a proxy that drops the first connections)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from kd_ops.core.errors import ConfigError
from kd_ops.data.scenarios import sample
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.protocol import prediction_batch
from kd_ops.prediction_log.store import predictions

from ..conftest import tiny_raw
from ..servers import mlflow_server

pytestmark = pytest.mark.slow
NAME = "flow-student"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A champion distilled into its own registry, and a prediction log of 400 shifted rows it answered."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

    root = tmp_path_factory.mktemp("loop")
    tracking = f"sqlite:///{root}/mlflow.db"
    raw = tiny_raw(
        tracking,
        registry={"name": NAME},
        teacher={"augment": ["shift"], "epochs": 4},
        monitor={
            "store": f"sqlite:///{root}/predictions.db",
            "window_rows": 300,
            "min_labelled_rows": 50,
            "workspace": None,
            "alerts": {"state_file": str(root / "alerts.json")},
        },
        redistill={"production_rows": 400, "cooldown_minutes": 30},
    )
    result = run_distillation(config_from_dict(raw, "loop"))
    assert result.registered["champion"] == result.registered["version"] == "1"
    x, _ = sample(result.datamodule, "shift", 400, seed=5)
    with torch.inference_mode():
        probs = torch.softmax(result.models["student"](torch.as_tensor(x)), 1).numpy()
    log = PredictionLog.open_sync(raw["monitor"]["store"])
    for i in range(0, 400, 100):
        log.write(predictions, prediction_batch(NAME, "1", x[i : i + 100], probs[i : i + 100], [{}] * 100))
    log.close()
    path = root / "loop.yaml"
    path.write_text(yaml.safe_dump(raw))
    return {"config": str(path), "tracking": tracking, "root": root, "raw": raw}


def _champion(tracking: str) -> str:
    import mlflow

    return str(mlflow.MlflowClient(tracking).get_model_version_by_alias(NAME, "champion").version)


def _runs_of(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_deployments_carry_their_schedules_trigger_and_concurrency(harness, loop):
    from prefect.client.orchestration import get_client

    from flows.deploy import deployments

    monitor, redistill = deployments(loop["config"], ["monitor.interval_minutes=15"])
    ids = {d.name + d.flow_name: d.apply() for d in (monitor, redistill)}
    assert len(ids) == 2
    with get_client(sync_client=True) as client:
        m = client.read_deployment_by_name(f"kd-ops-monitor/{NAME}")
        (schedule,) = m.schedules
        assert schedule.schedule.interval.total_seconds() == 15 * 60
        assert m.concurrency_options.collision_strategy == "CANCEL_NEW"  # after downtime: one run, not a burst
        assert m.parameters == {"config_path": loop["config"], "overrides": ["monitor.interval_minutes=15"]}

        r = client.read_deployment_by_name(f"kd-ops-redistill/{NAME}")
        (weekly,) = r.schedules
        assert weekly.schedule.cron == "0 3 * * 0" and weekly.parameters == {"trigger": "schedule 0 3 * * 0"}
        assert r.global_concurrency_limit.limit == 1 and r.concurrency_options.collision_strategy == "CANCEL_NEW"
        (automation,) = client.read_resource_related_automations(f"prefect.deployment.{r.id}")
        trigger = automation.trigger
        assert trigger.expect == {"kd-ops.monitor.alert"}
        assert trigger.match.model_dump()["prefect.resource.id"] == f"kd-ops.model.{NAME}"
        assert trigger.within.total_seconds() == 30 * 60 and trigger.threshold == 1
        # One re-distillation per alert: its key is the event's id, so a rerun finds the candidate.
        (action,) = automation.actions
        assert action.parameters["trigger_key"] == "event-{{ event.id }}"


def test_a_cron_prefect_refuses_names_its_key(loop):
    from flows.deploy import deployments

    with pytest.raises(ConfigError, match=r"redistill.cron = '61 \* \* \* \*'"):
        deployments(loop["config"], ["redistill.cron=61 * * * *"])


def test_drift_alert_starts_one_redistill_that_completes(harness, loop):
    """monitor flow -> alert -> event -> automation -> redistill run (executed by a Runner, in a
    subprocess, as `kd-ops deploy` would) -> COMPLETED; a second alert within the cooldown starts nothing."""
    from prefect.runner import Runner

    from flows.deploy import deployments
    from flows.monitor import monitor_flow

    _, redistill = deployments(loop["config"])
    runner = Runner(query_seconds=1, pause_on_shutdown=False)
    deployment_id = runner.add_deployment(redistill)

    first = monitor_flow(loop["config"])
    assert first["status"] == "alert" and first["event_id"]
    deadline = time.monotonic() + 60
    while not _runs_of(deployment_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    second = monitor_flow(loop["config"])  # the drift persists: alert again, event again
    assert second["status"] == "alert" and second["event_id"]
    time.sleep(3)

    (run,) = _runs_of(deployment_id)  # two events, one run: the trigger's cooldown
    assert "drift alert on v1" in run.parameters["trigger"]
    asyncio.run(runner.start(run_once=True))
    (run,) = _runs_of(deployment_id)
    assert run.state.is_completed(), run.state

    import mlflow

    client = mlflow.MlflowClient(loop["tracking"])
    versions = client.search_model_versions(f"name = '{NAME}'")
    (new,) = [v for v in versions if v.tags.get("kd_ops.redistill.trigger", "").startswith("drift alert on v1")]
    assert new.tags["kd_ops.redistill.champion"] == "1"


def test_a_failing_gate_leaves_the_champion(harness, loop):
    from flows.redistill import redistill_flow

    before = _champion(loop["tracking"])
    out = redistill_flow(loop["config"], ["redistill.min_recent_gain=1.01"], ignore_cooldown=True)
    assert out["promoted"] is False and "min_recent_gain_vs_champion" in out["reason"]
    assert out["reason"].startswith(f"kept v{before}")
    assert _champion(loop["tracking"]) == before

    import mlflow

    version = mlflow.MlflowClient(loop["tracking"]).get_model_version(NAME, out["candidate_version"])
    assert version.tags["kd_ops.gates"] == "failed"
    assert version.tags["kd_ops.gate.min_recent_gain_vs_champion"].startswith("FAIL")


@pytest.fixture(scope="module")
def recently_redistilled(loop):
    """At least one re-distillation of the model in the last minutes (the tests above made some)."""
    from kd_ops.config.loading import load_config
    from kd_ops.pipeline.redistill import last_redistillation, run_redistillation

    cfg = load_config(loop["config"])
    if last_redistillation(cfg) is None:
        run_redistillation(cfg, trigger="test")


def test_the_cooldown_skips_a_second_redistill(harness, loop, recently_redistilled):
    from flows.redistill import redistill_flow

    out = redistill_flow(loop["config"])  # versions were re-distilled minutes ago
    assert out["skipped"] and "cooldown_minutes = 30" in out["reason"]


def test_redistill_command_refuses_in_one_line(loop, recently_redistilled, tmp_path, capsys):
    from kd_ops.cli.main import main

    assert main(["redistill", loop["config"]]) == 2  # within the cooldown of the runs above
    assert "not re-distilling" in capsys.readouterr().err

    missing = f"sqlite:///{tmp_path}/missing.db"
    assert main(["redistill", loop["config"], "--ignore-cooldown", "--set", f"monitor.store={missing}"]) == 2
    err = capsys.readouterr().err
    assert "monitor.store" in err and "cannot read the prediction log" in err and "Traceback" not in err

    other = f"sqlite:///{tmp_path}/other.db"
    log = PredictionLog.open_sync(other)
    log.write(predictions, prediction_batch("another-model", "1", np.zeros((2, 64)), np.full((2, 10), 0.1), [{}] * 2))
    log.close()
    assert main(["redistill", loop["config"], "--ignore-cooldown", "--set", f"monitor.store={other}"]) == 2
    assert f"holds no predictions of '{NAME}'" in capsys.readouterr().err


class FlakyProxy:
    """127.0.0.1:port -> target; the first `drop` connections are closed at once (a server restarting)."""

    def __init__(self, target_port: int, drop: int):
        self.target, self.drop, self.accepted = target_port, drop, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drop:
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_transient_tracking_failure_is_retried(harness, loop, tmp_path, monkeypatch):
    """The tracking server drops the first two connections: the task that reads the registry is
    retried and succeeds; the error that follows (no such model there) is final and not retried."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.redistill import redistill_flow

    with mlflow_server(tmp_path) as (_, port):
        proxy = FlakyProxy(port, drop=2)
        try:
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # surface the failure to Prefect at once
            uri = f"http://127.0.0.1:{proxy.port}"
            state = redistill_flow(loop["config"], [f"tracking.uri={uri}"], return_state=True)
            assert state.is_failed()
            with pytest.raises(ConfigError, match=f"registered model '{NAME}' has no version with alias @champion"):
                state.result()
            with get_client(sync_client=True) as client:
                flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                tasks = {t.name.split("-")[0]: t for t in client.read_task_runs(flow_run_filter=flow_run)}
            assert proxy.accepted > 2
            assert tasks["recent_redistillation"].state.is_completed() and tasks["recent_redistillation"].run_count == 3
            assert tasks["train_candidate"].state.is_failed() and tasks["train_candidate"].run_count == 1
        finally:
            proxy.close()


def test_transient_errors_are_told_apart():
    from flows.common import is_transient

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("API request failed") from inner
    except RuntimeError as exc:
        assert is_transient(exc)
    assert not is_transient(ConfigError("registry.name: no such model"))
    assert not is_transient(ValueError("bad"))
    # Status codes count only as words: a run id or a shape that contains 503 is not an outage.
    assert not is_transient(RuntimeError("run 7a5031c9: shape (503, 64) does not fit"))
    assert is_transient(RuntimeError("API request to /runs/get failed with 503 Service Unavailable"))
    assert is_transient(
        RuntimeError("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 503 != 200")
    )


def _flow_run_record(run_id):
    """The flow run, its artifacts and its logs as the Prefect UI reads them from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        deadline = time.monotonic() + 30
        while True:  # Prefect sends logs in batches: the last ones may land just after the run ends
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            if any(entry.name.startswith(("kd_ops", "monitors")) for entry in logs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return (
        run,
        {a.type: a for a in artifacts if a.key and not a.key.endswith(("-metrics", "-accuracy"))},
        artifacts,
        logs,
    )


def test_flow_runs_say_what_they_did_in_the_prefect_ui(harness, loop, recently_redistilled):
    """Each flow run is named for what it did and holds its result as artifacts (verdict and
    reasons with links to the Evidently report; gates and decision) and kd-ops' own log lines."""
    from flows.monitor import monitor_flow
    from flows.redistill import redistill_flow

    workspace = loop["root"] / "evidently"
    state = monitor_flow(loop["config"], [f"monitor.workspace={workspace}"], return_state=True)
    result = state.result()
    run, main, artifacts, logs = _flow_run_record(state.state_details.flow_run_id)
    assert run.name == f"monitor {NAME} v{result['model_version']}: alert"
    report = main["markdown"].data
    assert f"# monitor {NAME} v{result['model_version']}: alert" in report
    assert result["evidently"]["dashboard"] and result["evidently"]["dashboard"] in report
    assert result["evidently"]["links"]["drift"] in report and "drift_share" in report
    (table,) = [a for a in artifacts if a.type == "table"]
    assert "drift_share" in str(table.data)
    messages = [(entry.name, entry.message) for entry in logs]
    assert any(name == "monitors.monitor" and "alert" in message for name, message in messages), messages

    state = redistill_flow(
        loop["config"],
        ["redistill.min_recent_gain=1.01"],
        trigger="drift alert on v1: test",
        ignore_cooldown=True,
        return_state=True,
    )
    out = state.result()
    run, main, artifacts, logs = _flow_run_record(state.state_details.flow_run_id)
    before, candidate = out["champion_before"], out["candidate_version"]
    assert run.name == f"redistill {NAME}: v{candidate} not promoted, v{before} stays champion"
    report = main["markdown"].data
    assert "trigger: drift alert on v1: test" in report and "min_recent_gain_vs_champion" in report
    assert "**FAIL**" in report and f"#/models/{NAME}/versions/{out['candidate_version']}" in report
    assert any(entry.name.startswith("kd_ops") for entry in logs), [entry.name for entry in logs]
    assert not any("://" in entry.message and ":***@" not in entry.message and "@" in entry.message for entry in logs)


def test_a_password_in_a_url_never_reaches_the_prefect_logs():
    import logging

    from flows.reporting import _MaskPasswords

    record = logging.LogRecord(
        "kd_ops.x", logging.INFO, __file__, 1, "store %s", ("postgresql://kd:s3cret@db/x",), None
    )
    assert _MaskPasswords().filter(record)
    assert record.getMessage() == "store postgresql://kd:***@db/x" and "s3cret" not in record.getMessage()
