"""`kd-ops sweep`: the grid, the ranking, and a real sweep of two cells on a local Dask cluster
under Prefect's test harness, nested in MLflow under one sweep run."""

from __future__ import annotations

import json

import pytest
import yaml

from kd_ops.core.errors import ConfigError
from kd_ops.pipeline.sweep import as_overrides, cells, parse_grid, rank, table

from ..conftest import tiny_raw


def test_a_grid_is_the_product_of_its_values_read_as_yaml():
    grid = parse_grid(["distill.temperature=2,4", "student.params.hidden=[16],[32, 16]", "distill.method=kd"])
    assert grid == {"distill.temperature": [2, 4], "student.params.hidden": [[16], [32, 16]], "distill.method": ["kd"]}
    out = cells(grid)
    assert len(out) == 4 and out[0] == {"distill.temperature": 2, "student.params.hidden": [16], "distill.method": "kd"}
    assert as_overrides(out[-1]) == ["distill.temperature=4", "student.params.hidden=[32, 16]", "distill.method=kd"]


@pytest.mark.parametrize(
    "specs, message",
    [
        ([], "at least one --grid"),
        (["distill.temperature"], "expected KEY=V1,V2"),
        (["seed=0,1", "seed=2"], "--grid seed: given twice"),
        (["seed=0,,1"], "an empty value"),
    ],
)
def test_a_bad_grid_names_what_is_wrong(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(specs)


def test_cells_rank_best_first_and_failures_last():
    results = [
        {"cell": {"seed": 0}, "metrics": {"test_accuracy": 0.8, "latency_ms_p95": 0.2}, "run_id": "a"},
        {"cell": {"seed": 1}, "error": "boom"},
        {"cell": {"seed": 2}, "metrics": {"test_accuracy": 0.9, "latency_ms_p95": 0.3}, "run_id": "c"},
    ]
    assert [r["cell"]["seed"] for r in rank(results, "test_accuracy")] == [2, 0, 1]
    assert [r["cell"]["seed"] for r in rank(results, "latency_ms_p95", higher_is_better=False)] == [0, 2, 1]
    md = table(rank(results, "test_accuracy"), "test_accuracy", ("test_accuracy", "latency_ms_p95"))
    assert md.splitlines()[0] == "| rank | seed | test_accuracy | latency_ms_p95 | run |"
    assert md.splitlines()[2].startswith("| 1 | 2 | 0.9000 | 0.3000 | c") and "failed: boom" in md.splitlines()[4]


@pytest.mark.slow
def test_a_sweep_runs_its_cells_in_parallel_and_nests_them_in_mlflow(tmp_path, capsys):
    import mlflow
    import prefect.settings as ps
    from prefect.testing.utilities import prefect_test_harness

    from kd_ops.cli.main import main

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tracking, registry={"name": "sweep-student"})))
    with (
        prefect_test_harness(server_startup_timeout=180),
        ps.temporary_settings(updates={ps.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        code = main(["sweep", str(path), "--grid", "distill.temperature=2,8", "--workers", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["failed"] == 0 and sorted(r["cell"]["distill.temperature"] for r in out["ranked"]) == [2, 8]
    accuracies = [r["metrics"]["test_accuracy"] for r in out["ranked"]]
    assert accuracies == sorted(accuracies, reverse=True)

    client = mlflow.MlflowClient(tracking)
    children = client.search_runs(
        [client.get_run(out["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{out['parent_run_id']}'",
    )
    assert sorted(float(r.data.params["distill.temperature"]) for r in children) == [2.0, 8.0]
    assert {r.info.run_id for r in children} == {r["run_id"] for r in out["ranked"]}
    sweep = client.get_run(out["parent_run_id"])
    assert sweep.data.tags["kd_ops.sweep.best_run"] == out["ranked"][0]["run_id"]
    assert sweep.data.metrics["best_test_accuracy"] == pytest.approx(accuracies[0])
    # A sweep explores: no cell becomes champion.
    versions = client.search_model_versions("name = 'sweep-student'")
    assert len(versions) == 2 and not any(v.aliases and "champion" in v.aliases for v in versions)


def test_a_typo_in_a_cell_fails_before_anything_runs(tmp_path, capsys):
    from kd_ops.cli.main import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(f"sqlite:///{tmp_path}/mlflow.db")))
    assert main(["sweep", str(path), "--grid", "distill.temprature=2,4"]) == 2
    assert "distill.temprature" in capsys.readouterr().err
    assert main(["sweep", str(path), "--grid", "seed=0,1", "--metric", "accuracy"]) == 2
    assert "--metric 'accuracy'" in capsys.readouterr().err
