"""`kd-ops demo` (`make demo`): the whole loop, on the embedded defaults, in a few minutes.

  1. a temporary Prefect server (its database under DIR/prefect, so the UI shows the runs later)
  2. distill flow: teacher -> student -> gates -> champion v1
  3. `kd-ops deploy`: the monitor and redistill deployments, served in a subprocess
  4. `kd-ops serve`: the champion on 127.0.0.1, every prediction in DIR/predictions.db
  5. clean traffic over HTTP, the monitor deployment: ok
  6. drifted traffic (a scenario of `kd_ops.data.scenarios`), the monitor deployment: alert ->
     `kd-ops.monitor.alert` event -> automation -> redistill run: the teacher labels the drifted
     inputs, a new student is distilled, gated against the champion, promoted
  7. the server swaps the new champion in; accuracy on fresh drifted traffic before and after

No new label is sent: the true labels are used only to print the accuracies at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows.processes import Service, free_port
from kd_ops.core.env import quiet_requested

BATCH = 50


def _say(msg: str) -> None:
    print(msg, flush=True)


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.stages: dict[str, float] = {}
        self._last = self.t0

    def stage(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = now - self._last
        self._last = now
        _say(f"   done in {self.stages[name]:.1f} s")


def _replay(url: str, x: np.ndarray) -> list[int]:
    """POST the rows to the server in batches; the classes it answered."""
    import requests

    out: list[int] = []
    with requests.Session() as s:
        for i in range(0, len(x), BATCH):
            r = s.post(f"{url}/predict", json={"rows": x[i : i + BATCH].tolist()}, timeout=30)
            r.raise_for_status()
            out += [p["class"] for p in r.json()["predictions"]]
    return out


def _flow_runs(deployment_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _deployment_id(name: str, deploy: Service, timeout: float = 120) -> Any:
    """The id of deployment `flow/name` once `kd-ops deploy` has registered it and its trigger."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if deploy.proc.poll() is not None:
                raise RuntimeError(f"kd-ops deploy exited with {deploy.proc.returncode}: {deploy.output()[-2000:]}")
            try:
                dep = client.read_deployment_by_name(name)
                if "redistill" not in name or client.read_resource_related_automations(f"prefect.deployment.{dep.id}"):
                    return dep.id
            except Exception:  # not registered yet
                pass
            time.sleep(0.5)
    raise TimeoutError(f"deployment {name} was not registered within {timeout:.0f} s")


def _wait_final(deployment_id: Any, timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _flow_runs(deployment_id)
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        if done and not done[0].state.is_completed():
            raise RuntimeError(f"redistill run {done[0].name} ended {done[0].state.name}; see {log}")
        if done:
            return done[0]
        time.sleep(1)
    raise TimeoutError(f"no run of the redistill deployment finished within {timeout:.0f} s")


def _monitor(name: str, log: Path) -> None:
    """One run of the monitor deployment, executed by the `kd-ops deploy` process."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, timeout=300)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"monitor run {run.name} ended {run.state and run.state.name}; see {log}")


def _latest_monitor(cfg: Any) -> tuple[str, list[str]]:
    """Status and reasons of the newest monitor run (the flow ran in the deploy process)."""
    from flows.replay import latest_monitor_result, monitor_summary

    verdict = monitor_summary(latest_monitor_result(cfg))
    return verdict["status"], verdict["reasons"]


@dataclass
class Stack:
    """The demo's servers and what the first distillation made: a Prefect server, the champion,
    `kd-ops deploy` serving the monitor and redistill deployments, `kd-ops serve` on the champion."""

    root: Path
    config_path: str
    overrides: list[str]
    tracking_uri: str
    store: str
    prefect_port: int
    services: list[Service] = field(default_factory=list)
    cfg: Any = None
    distilled: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    redistill_id: Any = None
    deploy_log: Path | None = None

    @property
    def name(self) -> str:
        return self.cfg.registry.name

    @property
    def first_version(self) -> str:
        return str(self.distilled["registered"]["version"])

    def stop(self, keep_prefect: bool = False) -> None:
        for service in reversed(self.services):
            if keep_prefect and service is self.services[0]:
                continue
            service.stop()

    def hints(self, keep_prefect: bool) -> None:
        """Where to look at what the demo made."""
        bin_dir = Path(sys.executable).parent
        kd = bin_dir.relative_to(Path.cwd()) if bin_dir.is_relative_to(Path.cwd()) else bin_dir
        _say("\nopen what it made:")
        _say(f"   {kd}/mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000")
        if keep_prefect:
            _say(f"   the Prefect UI is still up: http://127.0.0.1:{self.prefect_port}")
        else:
            _say(f"   PREFECT_HOME={self.root / 'prefect'} {kd}/prefect server start --host 127.0.0.1 --port 4200")
        _say(f"   {kd}/evidently ui --workspace {self.root / 'evidently'} --host 127.0.0.1 --port 8000")


def _fresh_dir(directory: str) -> Path:
    root = Path(directory).resolve()
    marker = root / ".kd-ops-demo"
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise RuntimeError(f"{root} is not empty and was not made by kd-ops demo: choose another --dir")
    if root.exists():
        shutil.rmtree(root)  # the previous demo's: each demo starts from nothing
    root.mkdir(parents=True)
    marker.touch()
    return root


def start_stack(config_path: str, directory: str, clock: _Clock, overrides: list[str] | None = None) -> Stack:
    """Steps 1-4 of every demo (see the module docstring); the caller stops the stack. A first
    student that fails its gates is a `RuntimeError`: there is nothing to serve."""
    root = _fresh_dir(directory)
    prefect_home = root / "prefect"
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    store = f"sqlite:///{root}/predictions.db"
    overrides = [
        f"tracking.uri={tracking_uri}",
        f"monitor.store={store}",
        f"monitor.workspace={root / 'evidently'}",
        f"monitor.alerts.state_file={root / 'alerts.json'}",
        *(overrides or []),
    ]
    prefect_port, serve_port = free_port(), free_port()
    quiet = quiet_requested()
    env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        # where the Prefect UI's own page calls the API (else the default port 4200)
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        # Prefect's INFO lines only with -v (KD_OPS_QUIET=0); the user's own setting wins.
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL") or ("WARNING" if quiet else "INFO"),
        "KD_OPS_TOKEN": "demo-token-not-secret",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    os.environ.update(env)  # before Prefect is imported here: its settings are read once
    python = sys.executable
    stack = Stack(root, config_path, overrides, tracking_uri, store, prefect_port)
    try:
        _say(f"1. Prefect server on 127.0.0.1:{prefect_port} (database in {prefect_home})")
        prefect_server = Service(
            [python, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            root / "prefect-server.log",
        )
        stack.services.append(prefect_server)
        prefect_server.wait_healthy(f"{env['PREFECT_API_URL']}/health", lambda r: r.ok, timeout=120)
        clock.stage("prefect server")

        import warnings

        warnings.filterwarnings("ignore")
        from flows.distill import distill_flow
        from kd_ops.config.loading import load_config

        stack.cfg = cfg = load_config(config_path, overrides)
        name = cfg.registry.name
        _say(f"2. distill flow: {config_path} -> {name}")
        out = stack.distilled = distill_flow(config_path, overrides)
        reg = out["registered"]
        _say(
            f"   {name} v{reg['version']}: accuracy {out['student']['test_accuracy']:.3f} (teacher "
            f"{out['teacher']['test_accuracy']:.3f}), gates {reg['gates']}, champion v{reg['champion']}"
        )
        if str(reg.get("champion")) != str(reg["version"]):
            raise RuntimeError("the first student did not pass its gates: nothing to serve")
        clock.stage("distill")

        _say("3. kd-ops deploy: monitor and redistill deployments")
        stack.deploy_log = root / "deploy.log"
        deploy = Service(
            [python, "-m", "kd_ops", "deploy", config_path, *sum((["--set", o] for o in overrides), [])],
            stack.deploy_log,
        )
        stack.services.append(deploy)
        _deployment_id(f"kd-ops-monitor/{name}", deploy)
        stack.redistill_id = _deployment_id(f"kd-ops-redistill/{name}", deploy)
        clock.stage("deploy")

        _say(f"4. kd-ops serve {name} on 127.0.0.1:{serve_port}")
        server = Service(
            [python, "-m", "kd_ops", "serve", name, "--port", str(serve_port), "--store", store]
            + ["--tracking-uri", tracking_uri, "--poll-interval", "2"],
            root / "serve.log",
        )
        stack.services.append(server)
        stack.url = f"http://127.0.0.1:{serve_port}"
        server.wait_healthy(f"{stack.url}/health", lambda r: r.ok, timeout=120)
        clock.stage("serve")
    except BaseException:
        stack.stop()
        raise
    return stack


def run_demo(config_path: str, directory: str, scenario: str, keep_servers: bool = False) -> int:
    """The loop on drift made here (a scenario of `kd_ops.data.scenarios`), no new label sent."""
    clock = _Clock()
    stack = start_stack(config_path, directory, clock)
    try:
        from kd_ops.data.datamodule import DistillDataModule
        from kd_ops.data.scenarios import sample
        from kd_ops.models.loading import load_model
        from kd_ops.pipeline.redistill import predict_classes

        cfg, name, url, root = stack.cfg, stack.name, stack.url, stack.root
        tracking_uri, reg = stack.tracking_uri, stack.distilled["registered"]
        monitor_name, redistill_id = f"kd-ops-monitor/{name}", stack.redistill_id
        dm = DistillDataModule(cfg.data, cfg.seed)
        rows = cfg.monitor.window_rows or 500
        x_clean, _ = sample(dm, "clean", rows, seed=1)
        _say(f"5. {rows} clean rows over HTTP, then the monitor deployment")
        _replay(url, x_clean)
        _monitor(monitor_name, root / "deploy.log")
        status, reasons = _latest_monitor(cfg)
        _say(f"   monitor: {status}" + "".join(f"\n     {r}" for r in reasons))
        clock.stage("clean traffic + monitor")

        n_drift = max(rows, cfg.redistill.production_rows)
        x_drift, y_drift = sample(dm, scenario, n_drift, seed=2)
        _say(f"6. {n_drift} rows of '{scenario}' traffic over HTTP, then the monitor deployment")
        answered = np.asarray(_replay(url, x_drift))
        _monitor(monitor_name, root / "deploy.log")
        status, reasons = _latest_monitor(cfg)
        _say(f"   monitor: {status}" + "".join(f"\n     {r}" for r in reasons))
        clock.stage("drifted traffic + monitor")
        if status != "alert":
            _say("   no alert, so no re-distillation: the loop stops here")
            return 1
        _say("   alert -> kd-ops.monitor.alert event -> automation -> redistill deployment")
        run = _wait_final(redistill_id, 600, root / "deploy.log")
        _say(f"   redistill flow run {run.name}: {run.state.name}")
        clock.stage("redistill")

        import mlflow

        champion = str(mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, "champion").version)
        promoted = champion != str(reg["version"])
        _say(f"7. champion is now v{champion}" + ("" if promoted else " (the re-distilled student was not promoted)"))
        if promoted:
            import requests

            deadline = time.monotonic() + 60
            while requests.get(f"{url}/model", timeout=5).json()["version"] != champion:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not swap in the new champion within 60 s")
                time.sleep(1)
        x_test, y_test = sample(dm, scenario, 1000, seed=3)  # fresh drifted rows, none of them trained on
        served = np.asarray(_replay(url, x_test))
        clock.stage("hot swap")
        if promoted:
            _say("8. the drift goes on; the monitor deployment judges the new champion's window")
            _monitor(monitor_name, root / "deploy.log")
            status, reasons = _latest_monitor(cfg)
            _say(f"   monitor: {status} (its reference is the traffic it was distilled for)")
            for reason in reasons:
                _say(f"     {reason}")
            clock.stage("monitor after")
        teacher_uri = (
            mlflow.MlflowClient(tracking_uri).get_model_version(name, champion).tags["kd_ops.teacher_model_uri"]
        )
        mlflow.set_tracking_uri(tracking_uri)
        old = load_model(f"models:/{name}/{reg['version']}", allow_pickle=cfg.allow_pickle)
        teacher = load_model(teacher_uri.split(",")[0], allow_pickle=cfg.allow_pickle)
        acc_old = float((predict_classes(old, x_test) == y_test).mean())
        acc_new = float((served == y_test).mean())
        acc_teacher = float((predict_classes(teacher, x_test) == y_test).mean())
        x_clean_test, y_clean_test = sample(dm, "clean", 1000, seed=3)
        clean_old = float((predict_classes(old, x_clean_test) == y_clean_test).mean())
        lost = clean_old - acc_old
        recovered = (acc_new - acc_old) / lost if lost > 0 else float("nan")
        clock.stage("evaluate")
        _say(f"\naccuracy on 1000 fresh '{scenario}' rows (labels used only here):")
        _say(
            f"   old champion v{reg['version']}   {acc_old:.3f}   (answered {float((answered == y_drift).mean()):.3f} "
            f"while the drift was live; {clean_old:.3f} on clean rows)"
        )
        _say(f"   new champion v{champion}   {acc_new:.3f}   (served over HTTP)")
        _say(f"   teacher             {acc_teacher:.3f}")
        _say(f"   recovered {recovered:.0%} of the accuracy the drift took, with no new label")
        _say(
            "\nstages: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in clock.stages.items())
            + f"; total {time.monotonic() - clock.t0:.0f} s"
        )
        stack.hints(keep_servers)
        return 0 if promoted else 1
    finally:
        stack.stop(keep_prefect=keep_servers)


def run_flights_demo(config_path: str, directory: str, keep_servers: bool = False) -> int:
    """The loop on a real year (`replay:` in the config, e.g. examples/flights.yaml): the first
    student is distilled on the months before `replay.start`, then the later months are replayed
    over HTTP with late, partial labels, and the deployments act on their own."""
    clock = _Clock()
    stack = start_stack(config_path, directory, clock)
    try:
        from flows.replay import DeployedLoop, Server, replay

        cfg = stack.cfg
        r = cfg.replay
        _say(
            f"5. kd-ops replay {r.start} .. {r.end} by {r.window}: {r.rows_per_window or 'every'} rows a {r.window},"
            f" {r.label_share:.0%} of labels {r.label_delay} {r.window}(s) late; after each {r.window} the monitor"
            " deployment judges it, and an alert triggers the redistill deployment"
        )
        reports = replay(
            cfg,
            Server(stack.url, os.environ["KD_OPS_TOKEN"]),
            DeployedLoop(cfg),
            seed=cfg.seed,
            on_window=lambda report: _say("   " + report.line().replace("\n", "\n   ")),
        )
        clock.stage("replay")
        alerts = [w.window for w in reports if w.monitor.get("status") == "alert"]
        runs = [w for w in reports if w.redistill and not w.redistill.get("skipped")]
        _say(f"\n{len(reports)} {r.window}s replayed; alerts in {', '.join(alerts) or 'none'}")
        for w in runs:
            verdict = "promoted" if w.redistill.get("promoted") else "not promoted"
            _say(f"   {w.window}: re-distilled v{w.redistill.get('version')}, {verdict}")
        _say(f"   champion at the end: v{reports[-1].champion_after if reports else stack.first_version}")
        served = [w.accuracy for w in reports if w.rows]
        _say(f"   served accuracy over the replay: {np.mean(served):.3f} (labels used only for this figure)")
        _say(
            "\nstages: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in clock.stages.items())
            + f"; total {time.monotonic() - clock.t0:.0f} s"
        )
        stack.hints(keep_servers)
        return 0
    finally:
        stack.stop(keep_prefect=keep_servers)
