"""`kd-ops replay`: a table's later rows sent to a running `kd-ops serve` as traffic, in time order,
window by window, with feedback labels that arrive late and for a share of the predictions.

Per window (a month, a week or a day of the table's time column, `--from` to `--to` inclusive):

  1. feedback due now: the true labels of a `label_share` of the predictions made `label_delay`
     windows ago are posted to /feedback (one request per window, with a request id, so a retry
     stores nothing twice); labels of later windows are still in the future and never sent
  2. traffic: the window's rows (all, or `rows_per_window` of them drawn at random), oldest
     first, POSTed to /predict in batches as records; the server logs every prediction
  3. the loop acts: the monitor judges the window (the `kd-ops-monitor` deployment, run as its
     schedule would at the window's end, or the flow in this process); an alert fires the
     `kd-ops.monitor.alert` event and the redistill deployment's own trigger starts a run, which
     the replay waits for; then it waits until the server serves the champion alias
  4. a report: served versions, the monitor's verdict and reasons, labelled rows, feedback sent,
     the re-distillation and whether it was promoted, the served accuracy (labels used only here)

A label is read by nothing before it is posted, and it is posted only once its window is
`label_delay` windows old: what any decision could see is what a production system would have
seen. The replay stops by itself after the last window. Time in the prediction log is the
replay's wall clock, not the table's: windows are judged by rows (`monitor.window_rows`), and
the replay waits for the loop between windows, so one window's alert cannot act on the next
window's traffic.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.loop import ReplayConfig
from kd_ops.core.errors import ConfigError
from kd_ops.data.tables import plain_value

log = logging.getLogger(__name__)
FREQUENCIES = {"month": "M", "week": "W", "day": "D"}


@dataclass
class WindowReport:
    window: str  # the period, e.g. 2013-04
    rows: int  # predictions sent
    served_versions: list[str]
    accuracy: float  # of the served answers (the table's labels, used for this figure only)
    feedback_sent: int  # labels posted in this window (for predictions `label_delay` windows old)
    feedback_for: str | None  # which window those labels belong to
    feedback_share: float  # posted labels over that window's predictions (0 when none were due)
    monitor: dict[str, Any] = field(default_factory=dict)  # status, reasons, labelled rows, ...
    redistill: dict[str, Any] | None = None  # version, promoted, reason; None: none ran
    champion_after: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The window as `kd-ops replay` and the demo print it."""
        m = self.monitor
        out = (
            f"{self.window}  served v{'/v'.join(self.served_versions)}  {self.rows} rows  accuracy {self.accuracy:.3f}"
            f"  feedback {self.feedback_sent}"
            + (f" labels ({self.feedback_share:.0%} of {self.feedback_for})" if self.feedback_for else "")
            + f"  monitor: {m.get('status')} ({m.get('labelled_rows') or 0} labelled rows)"
        )
        for reason in m.get("reasons", [])[:4]:
            out += f"\n    {reason}"
        if self.redistill:
            out += f"\n    re-distillation: {self.redistill.get('reason')}"
        return out


class Loop(Protocol):
    """What acts on a window once its traffic is in the log."""

    def after_window(self, window: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The monitor's verdict, and the re-distillation it led to (None: none)."""
        ...


# -- traffic ---------------------------------------------------------------------------------------
@dataclass
class Traffic:
    """A table's rows cut into time windows, with the columns a served table model takes."""

    frame: Any  # pandas DataFrame, in time order
    periods: Any  # pandas PeriodIndex, one per row
    label: str
    windows: list[str]

    def rows(self, window: str, limit: int | None, seed: int) -> Any:
        part = self.frame[self.periods == window]
        if limit is not None and limit < len(part):
            keep = np.sort(np.random.default_rng(seed).choice(len(part), size=limit, replace=False))
            part = part.iloc[keep]
        return part


def traffic(cfg: ExperimentConfig, start: str, end: str, window: str = "month") -> Traffic:
    """The rows of the config's table from `start` to `end` (inclusive periods), in time order."""
    import pandas as pd

    from kd_ops.data.datamodule import source_table, table_spec
    from kd_ops.data.tables import time_values

    if window not in FREQUENCIES:
        raise ConfigError(f"--window {window!r}: one of {', '.join(FREQUENCIES)}")
    frame, defaults, _, where = source_table(cfg.data)
    spec = table_spec(cfg.data, defaults)
    if not spec.time:
        raise ConfigError("replay needs data.time: the column that orders the rows in time")
    freq = FREQUENCIES[window]
    try:
        first, last = pd.Period(start, freq=freq), pd.Period(end, freq=freq)
    except ValueError as exc:
        raise ConfigError(f"--from {start!r} / --to {end!r}: not a time ({exc})") from None
    if last < first:
        raise ConfigError(f"--to {end!r} is before --from {start!r}")
    times = pd.DatetimeIndex(time_values(frame, spec.time, where))
    periods = times.to_period(freq)
    order = np.argsort(times.to_numpy(), kind="stable")
    frame, periods = frame.iloc[order].reset_index(drop=True), periods[order]
    inside = (periods >= first) & (periods <= last)
    if not inside.any():
        raise ConfigError(f"{where} holds no rows from {start} to {end} (data.time = {spec.time!r})")
    frame, periods = frame[inside].reset_index(drop=True), periods[inside]
    windows = [str(p) for p in pd.period_range(first, last, freq=freq)]
    return Traffic(frame, periods.astype(str), spec.label, windows)


def _records(part: Any, columns: list[str]) -> list[dict[str, Any]]:
    """JSON-ready records of the served model's columns (None for a missing value)."""
    out = []
    for row in part[columns].itertuples(index=False, name=None):
        values = (plain_value(v) for v in row)
        out.append({n: None if isinstance(v, float) and math.isnan(v) else v for n, v in zip(columns, values)})
    return out


# -- the replay ------------------------------------------------------------------------------------
class Server:
    """The running `kd-ops serve`: predictions, feedback, and the version it serves."""

    def __init__(self, url: str, token: str | None, batch: int = 200):
        import requests

        self.url, self.batch = url.rstrip("/"), batch
        self.session = requests.Session()
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def model(self) -> dict[str, Any]:
        r = self.session.get(f"{self.url}/model", timeout=30)
        r.raise_for_status()
        return r.json()

    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(records), self.batch):
            r = self.session.post(f"{self.url}/predict", json={"records": records[i : i + self.batch]}, timeout=60)
            if r.status_code != 200:
                raise ConfigError(f"POST {self.url}/predict answered {r.status_code}: {r.text[:500]}")
            out += r.json()["predictions"]
        return out

    def feedback(self, labels: list[tuple[str, Any]], request_id: str) -> int:
        stored = 0
        for i in range(0, len(labels), 1000):
            chunk = labels[i : i + 1000]
            body = {
                "labels": [{"prediction_id": pid, "label": y} for pid, y in chunk],
                "request_id": f"{request_id}-{i // 1000}",
            }
            r = self.session.post(f"{self.url}/feedback", json=body, headers=self.auth, timeout=60)
            if r.status_code != 200:
                raise ConfigError(f"POST {self.url}/feedback answered {r.status_code}: {r.text[:500]}")
            stored += int(r.json()["stored"])
        return stored

    def wait_for(self, version: str, timeout: float = 120) -> None:
        """Until the server serves `version` (it polls the alias)."""
        deadline = time.monotonic() + timeout
        while self.model()["version"] != version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} did not swap in v{version} within {timeout:.0f} s")
            time.sleep(0.5)


def replay(
    cfg: ExperimentConfig,
    server: Server,
    loop: Loop,
    how: ReplayConfig | None = None,
    seed: int = 0,
    on_window: Callable[[WindowReport], None] | None = None,
) -> list[WindowReport]:
    """Send the table's rows from `how.start` to `how.end` (default: the config's `replay`
    section) to `server` window by window (see the module docstring); returns one report per
    window, and stops after the last."""
    how = how or cfg.replay
    if not how.start or not how.end:
        raise ConfigError("replay.start and replay.end (--from and --to): the first and last window to send")
    label_share, label_delay, rows_per_window = how.label_share, how.label_delay, how.rows_per_window
    if not 0 <= label_share <= 1:
        raise ConfigError(f"--label-share {label_share}: a share between 0 and 1")
    if label_delay < 0:
        raise ConfigError(f"--label-delay {label_delay}: windows, 0 or more")
    data = traffic(cfg, how.start, how.end, how.window)
    info = server.model()
    if info.get("input") != "records" or not info.get("columns"):
        raise ConfigError(f"{server.url} serves {info['name']} v{info['version']}, which does not take table records")
    columns = [c["name"] for c in info["columns"]]
    rng = np.random.default_rng(seed)
    sent: dict[str, list[tuple[str, Any]]] = {}  # window -> (prediction id, true label) of its rows
    reports: list[WindowReport] = []
    for i, name in enumerate(data.windows):
        # 1. the labels that arrive now: those of the window `label_delay` back
        due = data.windows[i - label_delay] if i >= label_delay else None
        posted = 0
        if due is not None and label_delay > 0:
            posted = _post_labels(server, sent.get(due, []), label_share, rng, f"replay-{due}-labels")
        # 2. the window's traffic, oldest first
        part = data.rows(name, rows_per_window, seed + i)
        answers = server.predict(_records(part, columns)) if len(part) else []
        truth = [plain_value(v) for v in part[data.label]]
        sent[name] = [(a["id"], y) for a, y in zip(answers, truth)]
        if label_delay == 0:
            due, posted = name, _post_labels(server, sent[name], label_share, rng, f"replay-{name}-labels")
        hits = [a["class"] == y for a, y in zip(answers, truth)]
        # 3. the loop acts on what the log now holds
        verdict, redistilled = loop.after_window(name)
        champion = server.model()["version"]
        if redistilled and redistilled.get("champion_after"):
            champion = str(redistilled["champion_after"])
            server.wait_for(champion)
        report = WindowReport(
            name,
            len(answers),
            sorted({str(a["model_version"]) for a in answers}),
            float(np.mean(hits)) if hits else float("nan"),
            posted,
            due if posted else None,
            posted / len(sent[due]) if posted and sent.get(due) else 0.0,
            verdict,
            redistilled,
            champion,
        )
        reports.append(report)
        if on_window is not None:
            on_window(report)
    return reports


def _post_labels(server: Server, rows: list[tuple[str, Any]], share: float, rng: Any, request_id: str) -> int:
    if not rows or share <= 0:
        return 0
    n = int(round(share * len(rows)))
    chosen = sorted(rng.choice(len(rows), size=n, replace=False)) if n < len(rows) else range(len(rows))
    return server.feedback([rows[j] for j in chosen], request_id)


# -- loops ---------------------------------------------------------------------------------------------
def monitor_summary(result: dict[str, Any]) -> dict[str, Any]:
    window = result.get("window", {})
    return {
        "status": result.get("status"),
        "version": str(result.get("model_version", "")),
        "reasons": [f"{r['status']}: {r['message']}" for r in result.get("reasons", [])],
        "rows": window.get("rows"),
        "labelled_rows": window.get("labelled_rows"),
        "accuracy": result.get("metrics", {}).get("accuracy"),
        "estimated_accuracy": result.get("metrics", {}).get("estimated_accuracy"),
        "skipped": result.get("skipped", []),
    }


class InlineLoop:
    """The monitor and redistill flows run in this process, against whichever Prefect API is set
    (a test harness, a temporary server): the same flows the deployments run, without a scheduler.
    An alert starts the redistill flow as the deployment's trigger would (cooldown included)."""

    def __init__(self, config_path: str, overrides: list[str]):
        self.config_path, self.overrides = config_path, overrides

    def after_window(self, window: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from flows.monitor import monitor_flow
        from flows.redistill import redistill_flow

        result = monitor_flow(self.config_path, self.overrides)
        verdict = monitor_summary(result)
        if result["status"] != "alert":
            return verdict, None
        summary = "; ".join(r["message"] for r in result["reasons"] if r["status"] == "alert")
        out = redistill_flow(
            self.config_path,
            self.overrides,
            trigger=f"drift alert on v{result['model_version']} ({window}): {summary}",
            trigger_key=f"replay-{window}-{result.get('run_id') or ''}",
        )
        return verdict, redistill_summary(out)


def redistill_summary(out: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": out.get("candidate_version"),
        "promoted": bool(out.get("promoted")),
        "reason": out.get("reason"),
        "skipped": bool(out.get("skipped")),
        "champion_after": out.get("champion_after"),
        "accuracy": out.get("accuracy", {}),
    }


class DeployedLoop:
    """The `kd-ops deploy` deployments act: the monitor deployment is run at the window's end (as
    its schedule would), and an alert's event starts the redistill deployment through its own
    trigger; the replay only watches for that run and waits until it ends."""

    def __init__(self, cfg: ExperimentConfig, settle_s: float = 15, timeout_s: float = 1800):
        self.cfg, self.settle_s, self.timeout_s = cfg, settle_s, timeout_s
        name = cfg.registry.name
        self.monitor_name, self.redistill_name = f"kd-ops-monitor/{name}", f"kd-ops-redistill/{name}"

    def _redistill_runs(self) -> list[Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(self.redistill_name)
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

    def after_window(self, window: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from prefect.deployments import run_deployment

        before = {r.id for r in self._redistill_runs()}
        run = run_deployment(self.monitor_name, timeout=self.timeout_s)
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"monitor run {run.name} ended {run.state and run.state.name}")
        verdict = monitor_summary(latest_monitor_result(self.cfg))
        if verdict["status"] != "alert":
            return verdict, None
        # The alert's event reaches the automation within seconds; a run that does not appear
        # was held back by the trigger's cooldown or by redistill.on_alert: false.
        deadline = time.monotonic() + self.settle_s
        new: list[Any] = []
        while not new and time.monotonic() < deadline:
            time.sleep(1)
            new = [r for r in self._redistill_runs() if r.id not in before]
        if not new:
            return verdict, None
        deadline = time.monotonic() + self.timeout_s
        while True:
            runs = {r.id: r for r in self._redistill_runs()}
            current = runs[new[0].id]
            if current.state is not None and current.state.is_final():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redistill run {current.name} did not end within {self.timeout_s:.0f} s")
            time.sleep(1)
        if not current.state.is_completed():
            raise RuntimeError(f"redistill run {current.name} ended {current.state.name}")
        return verdict, redistill_from_registry(self.cfg, current.name)


def latest_monitor_result(cfg: ExperimentConfig) -> dict[str, Any]:
    """The newest monitor run's result, from MLflow (the flow ran in the deploy process)."""
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(f"{cfg.tracking.experiment}-monitor")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/monitor_result.json")


def redistill_from_registry(cfg: ExperimentConfig, run_name: str) -> dict[str, Any]:
    """What a redistill run in another process did, read back from the registry: its candidate
    (the newest re-distilled version), the gates, and the champion now."""
    import mlflow

    from kd_ops.pipeline.redistill import TAG_REDISTILL
    from kd_ops.registry.gates import TAG_GATE_PREFIX, TAG_GATES

    client = mlflow.MlflowClient(cfg.tracking.uri)
    name = cfg.registry.name
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if TAG_REDISTILL in v.tags]
    if "skipped" in run_name or not versions:
        return {"version": None, "promoted": False, "reason": run_name, "skipped": True, "champion_after": champion}
    newest = max(versions, key=lambda v: int(v.version))
    failed = [
        f"{k.removeprefix(TAG_GATE_PREFIX)} {v}"
        for k, v in newest.tags.items()
        if k.startswith(TAG_GATE_PREFIX) and v.startswith("failed")
    ]
    return {
        "version": str(newest.version),
        "promoted": champion == str(newest.version),
        "reason": run_name + (f" ({'; '.join(failed)})" if failed else ""),
        "skipped": False,
        "gates": newest.tags.get(TAG_GATES),
        "champion_after": champion,
    }
