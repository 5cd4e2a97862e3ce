"""`kd-ops monitor` end to end: a real prediction log, the reference in MLflow, the verdict and the
Evidently report recorded in MLflow and in an Evidently workspace, and the alert at a real webhook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from kd_ops.data.scenarios import sample
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.feedback import feedback_rows
from kd_ops.prediction_log.protocol import prediction_batch
from kd_ops.prediction_log.store import feedback, predictions

from ..conftest import tiny_raw
from .test_alerts import Receiver

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tracking_uri):
    """A distilled champion and a prediction log holding 600 of its answers on noisy traffic, half labelled."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

    root = tmp_path_factory.mktemp("monitor")
    raw = tiny_raw(tracking_uri, registry={"name": "monitor-student"})
    result = run_distillation(config_from_dict(raw, "monitor"))
    store = f"sqlite:///{root}/predictions.db"
    log = PredictionLog.open_sync(store)
    x, y = sample(result.datamodule, "noise", 600, seed=1)
    with torch.inference_mode():
        probs = torch.softmax(result.models["student"](torch.as_tensor(x)), 1).numpy()
    slices = [{"ink": s} for s in result.datamodule.input_slices().compute(x)["ink"]]
    ids = []
    for i in range(0, 600, 50):
        batch = prediction_batch(
            "monitor-student", result.registered["version"], x[i : i + 50], probs[i : i + 50], slices[i : i + 50]
        )
        log.write(predictions, batch)
        ids += batch["ids"]
    log.write(feedback, feedback_rows([(pid, int(label)) for pid, label in zip(ids[::2], y[::2])]))
    log.close()
    return {"raw": raw, "store": store, "root": root, "result": result}


def _config(deployed, receiver, **monitor) -> str:
    raw = {
        **deployed["raw"],
        "monitor": {
            "store": deployed["store"],
            "workspace": str(deployed["root"] / "workspace"),
            "alerts": {
                "hooks": [{"type": "webhook", "url": receiver.url}],
                "state_file": str(deployed["root"] / "state.json"),
            },
            **monitor,
        },
    }
    path = deployed["root"] / "monitor.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_monitor_records_alerts_and_dedupes(deployed, capsys, tracking_uri):
    import mlflow
    from evidently.core.report import Snapshot
    from evidently.ui.workspace import Workspace

    from kd_ops.cli.main import main

    receiver = Receiver()
    try:
        config = _config(deployed, receiver)
        assert main(["monitor", config, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["status"] == "alert" and out["window"]["rows"] == 600 and out["window"]["labelled_rows"] == 300
        assert "drift_share" in {r["signal"] for r in out["reasons"]} and out["metrics"]["accuracy_drop"] > 0
        assert out["window"]["alert_hooks"]["sent"] and len(receiver.requests) == 1
        sent = json.loads(receiver.requests[0]["body"])
        assert sent["model_name"] == "monitor-student" and sent["status"] == "alert"

        run = mlflow.MlflowClient(tracking_uri).get_run(out["run_id"])
        assert run.data.tags["kd_ops.monitor.status"] == "alert"
        assert run.data.tags["kd_ops.monitor.model_version"] == deployed["result"].registered["version"]
        assert run.data.metrics["drift_share"] == pytest.approx(out["metrics"]["drift_share"])
        files = {f.path for f in mlflow.MlflowClient(tracking_uri).list_artifacts(out["run_id"], "evidently")}
        kinds = ("drift", "quality", "summary")
        assert files == {f"evidently/{kind}.{ext}" for kind in kinds for ext in ("html", "json")}

        ws = Workspace(str(deployed["root"] / "workspace"))
        (project,) = [p for p in ws.list_projects() if p.name == "kd-ops monitor-student"]
        runs = ws.list_runs(project.id)
        assert len(runs) == 3  # the drift, quality and summary reports of this window
        assert set(out["evidently"]["snapshots"]) == set(kinds) and out["evidently"]["project_id"] == str(project.id)
        assert out["evidently"]["links"]["drift"].endswith(f"/reports/{out['evidently']['snapshots']['drift']}")
        assert run.data.tags["kd_ops.evidently.project"] == str(project.id)
        stored = {ws.get_run(project.id, r).name.split(":")[0]: ws.get_run(project.id, r) for r in runs}
        version = deployed["result"].registered["version"]
        for kind, snap in stored.items():
            assert {"kd-ops", kind, "alert", f"v{version}"} <= set(snap.tags)
            assert snap.metadata["verdict"] == "alert" and snap.metadata["rows"] == "600"
            assert snap.metadata["model"] == "monitor-student" and snap.metadata["model_version"] == version
            assert "drift_share" in snap.metadata["reasons"] and snap.metadata["mlflow_run_id"] == out["run_id"]
            assert snap.timestamp.isoformat().startswith(snap.metadata["window_end"][:19])
        # The summary's MeanValue figures are the monitor's own numbers
        summary = {
            m["config"].get("column"): m["value"] for m in Snapshot.load_model(stored["summary"]).dict()["metrics"]
        }
        assert summary["accuracy (labelled rows)"] == pytest.approx(out["metrics"]["accuracy"])
        assert summary["estimated accuracy (confidence, ATC)"] == pytest.approx(out["metrics"]["estimated_accuracy"])
        assert summary["verdict"] == 2 and summary["served version"] == int(version)
        slices = [k for k in summary if k and k.startswith("slice accuracy ink=")]
        assert slices and all(
            summary[k] == pytest.approx(out["metrics"][f"accuracy_slice_ink_{k.split('=')[1]}"]) for k in slices
        )

        dashboard = ws.get_dashboard(project.id)
        (tab,) = [t for t in dashboard.tabs if t.title == "kd-ops monitor"]
        titles = {p.title for p in dashboard.panels if p.id in tab.panels}
        assert {
            "Verdict per window",
            "Input drift: share of drifted columns",
            "Accuracy per slice (labelled rows)",
        } <= titles
        panels_before = len(dashboard.panels)

        # The same drift in the next window: recorded again, but the hook is not called again.
        assert main(["monitor", config, "--json", "--window-rows", "400"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["window"]["rows"] == 400 and again["window"]["alert_hooks"]["suppressed"]
        assert len(receiver.requests) == 1
        # The dashboard is kept, not added again; the new window's reports join the project
        assert len(ws.get_dashboard(project.id).panels) == panels_before
        assert len(ws.list_runs(project.id)) == 3 + len(again["evidently"]["snapshots"])
    finally:
        receiver.close()


def test_monitor_without_enough_rows_or_reference(deployed, capsys):
    from kd_ops.cli.main import main

    receiver = Receiver()
    try:
        config = _config(deployed, receiver, min_rows=5000)
        assert main(["monitor", config, "--json", "--no-record"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["status"] == "insufficient" and "600 rows < min_rows 5000" in out["skipped"][0]

        log = PredictionLog.open_sync(deployed["store"])
        x = np.zeros((1, 64), dtype=np.float32)
        log.write(predictions, prediction_batch("monitor-student", "999", x, np.full((1, 10), 0.1, np.float32), [{}]))
        log.close()
        assert main(["monitor", config, "--no-record"]) == 2
        assert "has no version 999" in capsys.readouterr().err
    finally:
        receiver.close()


def test_monitor_names_a_stored_value_it_cannot_decode(deployed, tmp_path, capsys):
    """A row whose probabilities text holds NaN (written by hand: orjson itself writes null) is one
    line naming table, column and row, exit code 2; not orjson's bare message."""
    import sqlite3

    from kd_ops.cli.main import main

    store = tmp_path / "predictions.db"
    log = PredictionLog.open_sync(f"sqlite:///{store}")
    x, _ = sample(deployed["result"].datamodule, "clean", 20, seed=2)
    version = deployed["result"].registered["version"]
    probs = np.full((20, 10), 0.1, np.float32)
    log.write(predictions, prediction_batch("monitor-student", version, x, probs, [{}] * 20))
    log.close()
    with sqlite3.connect(store) as conn:
        conn.execute(
            "INSERT INTO kd_ops_predictions (id, created_at, model_name, model_version, request_id, row_index,"
            " inputs, probabilities, predicted_class, confidence, slices)"
            " VALUES (?, ?, ?, ?, ?, 0, ?, ?, 0, 0.5, '{}')",
            (
                "f" * 32,
                "2999-01-01 00:00:00.000000",
                "monitor-student",
                version,
                "e" * 32,
                "[" + ", ".join(["0.0"] * 64) + "]",
                "[NaN" + ", 0.1" * 9 + "]",
            ),
        )
    receiver = Receiver()
    try:
        config = _config(deployed, receiver, store=f"sqlite:///{store}")
        assert main(["monitor", config, "--no-record"]) == 2
    finally:
        receiver.close()
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("kd-ops:")]
    assert "table kd_ops_predictions, column probabilities, row id='" + "f" * 32 + "'" in line
    assert "not valid JSON" in line and "Traceback" not in err
