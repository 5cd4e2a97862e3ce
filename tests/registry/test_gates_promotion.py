"""Gates, promotion and rollback against a real MLflow registry (SQLite), through the pipeline
and through the `kd-ops` command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kd_ops.cli.main import main
from kd_ops.config.loading import config_from_dict
from kd_ops.pipeline.distillation import run_distillation
from kd_ops.registry.promotion import CHAMPION, PREVIOUS, PromotionError, promote, rollback, state

from ..conftest import tiny_raw

NAME = "gated-student"


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@pytest.fixture(scope="module")
def two_versions(tracking_uri):
    """v1 passes its gates (promoted), v2 fails one (not promoted)."""
    passing = {"min_accuracy_retention": 0.0, "max_model_size_bytes": 1e9, "max_slice_drop_vs_champion": 1.0}
    first = run_distillation(
        config_from_dict(tiny_raw(tracking_uri, registry={"name": NAME}, gates=passing), "gates-pass")
    )
    failing = {"min_accuracy_retention": 0.0, "max_model_size_bytes": 1, "max_slice_drop_vs_champion": 1.0}
    second = run_distillation(
        config_from_dict(tiny_raw(tracking_uri, registry={"name": NAME}, gates=failing), "gates-fail")
    )
    return first, second


def test_passing_gates_promote_and_are_recorded(two_versions, tracking_uri):
    first, _ = two_versions
    client = MlflowClient(tracking_uri)
    assert first.registered["gates"] == "passed" and first.registered["promoted"] is True
    assert first.registered["champion"] == first.registered["version"]
    mv = client.get_model_version(NAME, first.registered["version"])
    assert mv.tags["kd_ops.gates"] == "passed"
    assert mv.tags["kd_ops.gate.min_accuracy_retention"].startswith("pass: ")
    assert "no champion yet" in mv.tags["kd_ops.gate.max_slice_drop_vs_champion"]
    recorded = json.loads(mlflow.artifacts.load_text(f"runs:/{first.runs['student']}/gates.json"))
    assert recorded["verdict"] == "passed"
    assert {g["gate"] for g in recorded["gates"]} == set(first.gates[i]["gate"] for i in range(3))
    for g in recorded["gates"]:
        assert set(g) >= {"gate", "value", "threshold", "passed"}


def test_failing_gate_changes_nothing(two_versions, tracking_uri):
    first, second = two_versions
    client = MlflowClient(tracking_uri)
    v1, v2 = first.registered["version"], second.registered["version"]
    assert second.registered["gates"] == "failed" and second.registered["promoted"] is False
    assert _alias(client, NAME, CHAMPION) == v1 and _alias(client, NAME, "challenger") == v2
    assert _alias(client, NAME, PREVIOUS) is None
    tags = client.get_model_version(NAME, v2).tags
    assert tags["kd_ops.gates"] == "failed"
    assert tags["kd_ops.gate.max_model_size_bytes"].startswith("FAIL: ")
    # the slice gate compared against the champion, on this run's rows
    assert f"vs champion v{v1}" in tags["kd_ops.gate.max_slice_drop_vs_champion"]
    by_gate = {g["gate"]: g for g in second.gates}
    assert by_gate["max_slice_drop_vs_champion"]["value"] == pytest.approx(0.0)  # same recipe, same seed


def test_artifacts_and_model_card(two_versions, tracking_uri):
    _, second = two_versions
    client = MlflowClient(tracking_uri)
    plots = {a.path for a in client.list_artifacts(second.runs["parent"], "plots")}
    assert plots == {
        "plots/accuracy_vs_latency.png",
        "plots/accuracy_vs_size.png",
        "plots/reliability.png",
        "plots/slice_accuracy.png",
    }
    confusion = mlflow.artifacts.load_dict(f"runs:/{second.runs['student']}/confusion_matrix.json")
    assert len(confusion["rows_true_columns_predicted"]) == 10
    card = client.get_model_version(NAME, second.registered["version"]).description
    assert card == mlflow.artifacts.load_text(f"runs:/{second.runs['student']}/model_card.md")
    teacher_uri = client.get_run(second.runs["teacher"]).data.tags["kd_ops.teacher_model_uri"]
    assert teacher_uri in card and "digits" in card
    assert "| test accuracy |" in card and "| teacher | baseline | student |" in card
    assert "`max_model_size_bytes`" in card and "**FAIL**" in card and "Not promoted" in card


def test_promote_refuses_failed_gates_then_force_and_rollback(two_versions, tracking_uri, capsys):
    first, second = two_versions
    v1, v2 = first.registered["version"], second.registered["version"]
    client = MlflowClient(tracking_uri)
    assert main(["promote", NAME, v2, "--tracking-uri", tracking_uri]) == 2
    assert "gates failed" in capsys.readouterr().err
    assert _alias(client, NAME, CHAMPION) == v1  # nothing changed

    assert main(["promote", NAME, v2, "--force", "--tracking-uri", tracking_uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": NAME, CHAMPION: v2, PREVIOUS: v1}
    assert client.get_model_version(NAME, v2).tags["kd_ops.promoted_by"] == "force"

    assert main(["rollback", NAME, "--tracking-uri", tracking_uri]) == 0
    assert f"champion v{v1}" in capsys.readouterr().out
    assert _alias(client, NAME, CHAMPION) == v1 and _alias(client, NAME, PREVIOUS) is None
    assert "kd_ops.rolled_back_at" in client.get_model_version(NAME, v2).tags
    assert main(["rollback", NAME, "--tracking-uri", tracking_uri]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert _alias(client, NAME, CHAMPION) == v1


def test_promote_and_rollback_errors_name_what_is_wrong(tracking_uri):
    with pytest.raises(PromotionError, match="registered model 'no-such-model' does not exist"):
        promote("no-such-model", 1, uri=tracking_uri)
    with pytest.raises(PromotionError, match="no-such-model"):
        rollback("no-such-model", uri=tracking_uri)


def _registry(tmp_path, name: str) -> tuple[str, MlflowClient]:
    """A fresh SQLite registry with three versions of `name` whose gates passed (no training needed)."""
    uri = f"sqlite:///{tmp_path}/{name}.db"
    client = MlflowClient(uri)
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(name, source=str(tmp_path), tags={"kd_ops.gates": "passed"})
    return uri, client


def test_rollback_walks_back_through_the_history(tmp_path):
    uri, client = _registry(tmp_path, "h")
    for v in ("1", "2", "3"):
        promote("h", v, uri=uri)
    assert state("h", client).to_json() == {"name": "h", CHAMPION: "3", PREVIOUS: "2"}
    assert rollback("h", uri=uri).to_json() == {"name": "h", CHAMPION: "2", PREVIOUS: "1"}
    assert rollback("h", uri=uri).to_json() == {"name": "h", CHAMPION: "1", PREVIOUS: None}
    with pytest.raises(PromotionError):
        rollback("h", uri=uri)
    with pytest.raises(PromotionError, match="no gate decision"):
        client.create_model_version("h", source=str(tmp_path))
        promote("h", "4", uri=uri)
    # a version deleted from the history is skipped, not a dead `previous`
    for v in ("2", "3", "4"):
        client.set_model_version_tag("h", v, "kd_ops.gates", "passed")
        promote("h", v, uri=uri)
    client.delete_model_version("h", "3")
    assert state("h", client).to_json() == {"name": "h", CHAMPION: "4", PREVIOUS: None}
    promote("h", "2", uri=uri)
    assert rollback("h", uri=uri).to_json() == {"name": "h", CHAMPION: "4", PREVIOUS: "2"}


RACER = textwrap.dedent(
    """
    import sys
    from kd_ops.registry.promotion import promote
    uri, version = sys.argv[1], sys.argv[2]
    for _ in range(6):
        promote("race", version, uri=uri)
        promote("race", "1", uri=uri)
    promote("race", version, uri=uri)
    """
)


@pytest.mark.slow
def test_racing_promotions_never_leave_the_model_without_a_champion(tmp_path):
    uri, client = _registry(tmp_path, "race")
    promote("race", "1", uri=uri)

    seen, stop = [], threading.Event()

    def watch():
        reader = MlflowClient(uri)
        while not stop.is_set():
            seen.append(_alias(reader, "race", CHAMPION))

    watcher = threading.Thread(target=watch)
    watcher.start()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, v]) for v in ("2", "3")]
    codes = [p.wait(timeout=300) for p in procs]
    stop.set()
    watcher.join()
    assert codes == [0, 0]
    assert len(seen) > 10 and None not in seen
    final = state("race", client)
    assert final.champion in {"2", "3"}
    # with the lock each promotion saw the one before it: `previous` is the other racer's
    # version or "1", never the champion itself and never lost
    assert final.previous in {"1", "2", "3"} - {final.champion}
    history = json.loads(client.get_registered_model("race").tags["kd_ops.champion_history"])
    assert history[-1] == final.champion and history[-2] == final.previous
