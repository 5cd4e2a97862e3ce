"""Each run's MLflow dataset inputs (the splits it saw, by context, with digests that follow the
rows), a re-distilled student's production window, and kd-ops' own log lines of those runs;
real distillations into a real MLflow on SQLite."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from kd_ops.config.training import DataConfig
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.registry.datasets import RunData, rows_digest
from kd_ops.registry.tracking import TAG_DATASET, TAG_TEACHER_URI

from ..conftest import tiny_raw

NAME = "datasets-student"


def _inputs(client: MlflowClient, run_id: str) -> dict[str, dict]:
    """A run's dataset inputs by context: name, digest, source, schema, profile and input tags."""
    out = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        ds = item.dataset
        out[tags.pop("mlflow.data.context")] = {
            "name": ds.name,
            "digest": ds.digest,
            "source_type": ds.source_type,
            "source": json.loads(ds.source),
            "schema": json.loads(ds.schema)["mlflow_colspec"],
            "profile": json.loads(ds.profile),
            "tags": tags,
        }
    return out


def test_teacher_baseline_and_student_runs_list_the_splits_they_saw(distilled, tracking_uri):
    _, result = distilled
    client = MlflowClient(tracking_uri)
    seen = {role: _inputs(client, result.runs[role]) for role in ("parent", "teacher", "baseline", "student")}
    assert set(seen["teacher"]) == {"training", "validation", "test"}
    assert set(seen["baseline"]) == {"training", "validation", "test"}
    assert set(seen["student"]) == {"transfer", "validation", "test"}
    assert set(seen["parent"]) == {"training", "transfer", "validation", "test"}
    assert seen["teacher"]["training"]["name"] == "digits/train"
    assert seen["student"]["transfer"]["name"] == "digits/transfer"
    assert seen["baseline"]["training"]["name"] == "digits/transfer"  # labels only, on the student's rows
    assert {seen[r]["test"]["name"] for r in seen} == {"digits/test"}

    # The same split has the same digest in every run: MLflow keeps it as one dataset.
    for context in ("validation", "test"):
        assert len({seen[r][context]["digest"] for r in seen}) == 1
    transfer = seen["student"]["transfer"]["digest"]
    assert seen["baseline"]["training"]["digest"] == transfer == seen["parent"]["transfer"]["digest"]
    assert seen["teacher"]["training"]["digest"] == seen["parent"]["training"]["digest"]
    # The digest is the rows: train_fraction 1 makes the transfer set the training split itself.
    dm = result.datamodule
    assert seen["teacher"]["training"]["digest"] == transfer == rows_digest(*dm.arrays("train"))
    assert seen["teacher"]["test"]["digest"] == rows_digest(*dm.arrays("test"))
    assert len({seen["parent"][c]["digest"] for c in ("training", "validation", "test")}) == 3

    test = seen["student"]["test"]
    fingerprint = client.get_run(result.runs["student"]).data.tags[TAG_DATASET]
    assert test["tags"] == {"rows": str(len(dm.splits.test)), TAG_DATASET: fingerprint}
    assert test["profile"]["num_rows"] == len(dm.splits.test) == sum(test["profile"]["rows_per_class"].values())
    assert test["source_type"] == "code" and test["source"]["tags"]["kd_ops.dataset"] == "digits"
    assert test["source"]["tags"]["kd_ops.loader"] == "kd_ops.data.datasets.load_digits"
    assert [s["tensor-spec"]["shape"] for s in test["schema"]] == [[-1, 64], [-1]]  # the rows, the class


def test_another_seed_or_split_gives_another_digest():
    def digests(seed: int = 0, **data) -> dict[str, str]:
        dm = DistillDataModule(DataConfig(name="digits", **data), seed=seed)
        run = RunData(dm, "fp")
        return {split: run.dataset(split).digest for split in ("train", "transfer", "val", "test")}

    base = digests()
    assert digests() == base  # a pure function of dataset, seed and fractions
    assert base["train"] == base["transfer"] and len({base["train"], base["val"], base["test"]}) == 3
    assert digests(seed=1)["test"] != base["test"]
    assert digests(test_fraction=0.25)["test"] != base["test"]
    half = digests(train_fraction=0.5)
    assert half["train"] == base["train"] and half["transfer"] != base["transfer"]


def test_a_table_from_a_file_lists_the_users_columns_and_its_path(tmp_path, tracking_uri):
    import mlflow

    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame(
        {
            "tenure": rng.integers(0, 72, n),
            "charges": rng.random(n) * 100,
            "contract": rng.choice(["Month-to-month", "One year", "Two year"], n),
            "senior": rng.random(n) < 0.2,
            "churn": rng.choice(["Yes", "No"], n),
        }
    )
    path = tmp_path / "churn.csv"
    frame.to_csv(path, index=False)
    dm = DistillDataModule(DataConfig(path="churn.csv", label="churn"), seed=0, base_dir=str(tmp_path))
    data = RunData(dm, "fp")
    ds = data.dataset("train")
    assert ds.name == "churn.csv/train"
    assert [(c.name, c.type.name) for c in ds.schema.inputs] == [
        ("tenure", "long"),
        ("charges", "double"),
        ("contract", "string"),
        ("senior", "boolean"),
        ("churn", "string"),
    ]

    mlflow.set_tracking_uri(tracking_uri)
    from kd_ops.registry.datasets import log_inputs

    with mlflow.start_run(experiment_id=mlflow.create_experiment("datasets-table")) as run:
        log_inputs(data.inputs("training", "test"))
    seen = _inputs(MlflowClient(tracking_uri), run.info.run_id)
    assert [c["name"] for c in seen["training"]["schema"]] == ["tenure", "charges", "contract", "senior", "churn"]
    assert seen["test"]["source_type"] == "local" and seen["test"]["source"] == {"uri": str(path.resolve())}
    assert seen["training"]["profile"]["rows_per_class"].keys() == {"No", "Yes"}


class _Lines(logging.Handler):
    """kd-ops' log records, kept (a module fixture cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tracking_uri, distilled):
    """A champion distilled from the session's teacher (loaded by URI), and a prediction log of
    160 of its answers, every other one with a feedback label."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation
    from kd_ops.prediction_log.feedback import feedback_rows
    from kd_ops.prediction_log.protocol import prediction_batch, prediction_rows
    from kd_ops.prediction_log.store import feedback, open_store, predictions

    _, first = distilled
    teacher_uri = MlflowClient(tracking_uri).get_run(first.runs["teacher"]).data.tags[TAG_TEACHER_URI]
    root = tmp_path_factory.mktemp("datasets")
    store = f"sqlite:///{root}/predictions.db"
    raw = tiny_raw(
        tracking_uri,
        teacher={"uri": teacher_uri},
        tracking={"experiment": "datasets"},
        registry={"name": NAME},
        gates={"min_test_accuracy": 0.1},
        distill={"cache": {"dir": str(root / "cache")}},
        monitor={"store": store, "workspace": None},
        redistill={"production_rows": 160, "min_recent_gain": -1.0, "max_reference_drop": 1.0},
    )
    cfg = config_from_dict(raw, "datasets")
    logger, handler = logging.getLogger("kd_ops"), _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        result = run_distillation(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    dm = result.datamodule
    rows = np.concatenate([dm.splits.test, dm.splits.val])[:160]
    x, y = dm.raw.x[rows] * 0.8, dm.raw.y[rows]  # fainter digits: traffic that moved
    probs = np.eye(dm.n_classes, dtype=np.float32)[y]
    logged = prediction_rows(prediction_batch(NAME, result.registered["version"], x, probs, [{}] * len(y)))
    logged = [{**r, "inputs": r["inputs"].tolist(), "probabilities": r["probabilities"].tolist()} for r in logged]
    engine = open_store(store)
    with engine.begin() as conn:
        conn.execute(predictions.insert(), logged)
        conn.execute(feedback.insert(), feedback_rows([(r["id"], int(t)) for r, t in zip(logged[::2], y[::2])]))
    engine.dispose()
    return {"cfg": cfg, "result": result, "lines": handler.lines, "teacher_uri": teacher_uri, "store": store}


def test_a_loaded_teacher_lists_only_the_split_it_was_scored_on(champion, tracking_uri):
    result = champion["result"]
    client = MlflowClient(tracking_uri)
    assert set(_inputs(client, result.runs["teacher"])) == {"test"}  # trained elsewhere: no training rows known
    assert set(_inputs(client, result.runs["baseline"])) == {"training", "validation", "test"}


def test_a_distillation_logs_each_stage_the_gates_and_the_promotion(champion):
    lines = "\n".join(champion["lines"])
    version = champion["result"].registered["version"]
    assert "distilling digits-kd-seed0 into experiment 'datasets' at sqlite:///" in lines
    assert f"teacher (loaded {champion['teacher_uri']}): test accuracy 0." in lines
    assert "baseline (labels only): test accuracy 0." in lines
    student = next(line for line in champion["lines"] if line.startswith("student (kd): "))
    assert "agreement 0." in student and "retention " in student and student.endswith(" s")
    assert f"registered {NAME} v{version} as @challenger (models:/m-" in lines
    assert "gate min_test_accuracy passed: test_accuracy 0." in lines and ", threshold >= 0.1" in lines
    assert f"{NAME} v{version} is @champion now (gates passed; previous: none)" in lines


def test_a_redistilled_student_shows_its_production_window_and_the_log_says_why(champion, tracking_uri, caplog):
    from kd_ops.pipeline.redistill import run_redistillation

    with caplog.at_level(logging.INFO, logger="kd_ops"):
        out = run_redistillation(champion["cfg"], trigger="test: datasets")
    assert out.rows == {"production_rows": 160, "feedback_labels": 80, "teacher_labels": 80, "holdout_rows": 40}

    client = MlflowClient(tracking_uri)
    parent = client.get_run(out.run_id)
    query = f"tags.mlflow.parentRunId = '{out.run_id}' AND tags.`kd_ops.role` = 'student'"
    (student_id,) = [r.info.run_id for r in client.search_runs([parent.info.experiment_id], query)]
    seen = _inputs(client, student_id)
    assert set(seen) == {"transfer", "validation", "test", "production window"}
    window = seen["production window"]
    assert window["name"] == f"{NAME}/production window" and window["profile"]["num_rows"] == 160
    tags = window["tags"]
    assert tags["rows"] == "160" and tags["model_version"] == "1" and tags["champion"] == "1"
    assert (tags["feedback_labels"], tags["teacher_labels"], tags["holdout_rows"]) == ("80", "80", "40")
    assert tags["feedback_share"] == "0.500" and tags["window_start"] <= tags["window_end"]
    assert window["source"]["tags"] == {"kd_ops.prediction_log": champion["store"], "kd_ops.model": NAME}
    assert set(_inputs(client, out.run_id)) == {"training", *seen}  # the parent lists them all

    # Production rows joined the transfer set (another digest); val and test are the champion's very rows.
    before = _inputs(client, champion["result"].runs["student"])
    assert seen["transfer"]["digest"] != before["transfer"]["digest"]
    assert seen["transfer"]["tags"]["extra_rows"] == "120"
    for context in ("validation", "test"):
        assert (seen[context]["name"], seen[context]["digest"]) == (before[context]["name"], before[context]["digest"])

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("kd_ops")]
    text = "\n".join(lines)
    assert (
        f"re-distilling {NAME} (champion v1): 160 production rows answered by v1 from " in text
        and "80 feedback-labelled, 80 teacher-labelled; 120 join the transfer set, 40 held out to gate" in text
    )
    assert "distilling digits-kd-seed0 into experiment 'datasets'" in text and "(120 of them extra)" in text
    assert "gate min_recent_gain_vs_champion passed: recent_gain " in text
    assert "gate max_reference_drop_vs_champion passed: reference_drop " in text
    assert f"re-distillation of {NAME}: {out.reason}" in text
    if out.promoted:
        assert f"{NAME} v{out.candidate_version} is @champion now (gates passed; previous: v1)" in text
