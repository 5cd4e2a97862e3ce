"""Every distillation method end to end through `kd-ops distill`, tracked in a real MLflow.

The teacher of most runs is loaded by URI from the shared `distilled` fixture, so each test
trains only students; feature taps on such a teacher use the module paths it was trained with
(`torch.export.unflatten`), and one test trains its teacher in the run instead.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kd_ops.cli.main import main
from kd_ops.distill.strategies.mutual import mutual_loss
from kd_ops.evaluation.metrics import COMMON_METRICS, STUDENT_METRICS
from kd_ops.models.ensemble import TeacherEnsemble
from kd_ops.registry.tracking import TAG_ROLE, TAG_TEACHER_URI

from ..conftest import tiny_raw

CNN_STUDENT = {"model": "cnn", "params": {"channels": [4, 8], "hidden": 16}, "epochs": 2}


@pytest.fixture(scope="module")
def teacher_uri(distilled, tracking_uri) -> str:
    _, result = distilled
    return MlflowClient(tracking_uri).get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]


def _distill(tmp_path, capsys, raw: dict, *sets: str) -> dict:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["distill", str(path), "--json", *sum((["--set", s] for s in sets), [])])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return json.loads(out.out)


def _config_error(tmp_path, capsys, raw: dict) -> str:
    """Run `kd-ops distill` on `raw`, expect exit 2, return stderr."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _raw(tracking_uri, tmp_path, **sections) -> dict:
    raw = tiny_raw(tracking_uri, **sections)
    raw["distill"] = {**raw["distill"], "baseline": False, "cache": {"dir": str(tmp_path / "cache")}}
    raw["registry"] = {"name": "method-student"}  # the tracking tests own `test-student`
    raw["student"]["epochs"] = 2
    return raw


METHODS = {
    "kd": {},
    "dkd": {"target_weight": 1.0, "nontarget_weight": 4.0},
    "hint": {"student": "net.1", "teacher": "net.head.2"},
    "rkd": {},
    "pkt": {},
    "crd": {"n_negatives": 128, "feat_dim": 32},
    "mutual": {"peers": 3},
    "born_again": {"generations": 2},
    "sklearn": {"model": "logistic_regression", "params": {"max_iter": 50}, "jitter_copies": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_end_to_end_with_metrics_in_mlflow(method, tmp_path, capsys, tracking_uri, teacher_uri):
    raw = _raw(tracking_uri, tmp_path)
    raw["teacher"] = {"uri": teacher_uri}
    raw["distill"].update(method=method, params=METHODS[method])
    out = _distill(tmp_path, capsys, raw)
    client = MlflowClient(tracking_uri)
    student = client.get_run(out["runs"]["student"])
    teacher = client.get_run(out["runs"]["teacher"])
    assert student.data.params["method"] == method
    assert set(COMMON_METRICS) | set(STUDENT_METRICS) <= set(student.data.metrics)
    evaluated = {k for k in teacher.data.metrics if k.startswith("test_")}
    assert evaluated == {k for k in student.data.metrics if k.startswith("test_")}
    assert 0.0 < out["student"]["test_accuracy"] <= 1.0
    version = client.get_model_version_by_alias("method-student", "challenger")
    assert str(version.version) == out["registered"]["version"]
    assert version.tags["kd_ops.method"] == method


@pytest.mark.slow
def test_feature_methods_with_a_teacher_trained_in_the_run(tmp_path, capsys, tracking_uri):
    """hint + attention on conv features, combined with KD as a weighted list of losses."""
    raw = _raw(tracking_uri, tmp_path, student=CNN_STUDENT)
    raw["teacher"]["epochs"] = 1
    raw["distill"]["losses"] = [
        {"name": "hint", "weight": 0.5, "params": {"student": "net.head.2", "teacher": "net.head.2"}},
        {"name": "attention", "weight": 10.0, "params": {"pairs": [["net.features.2", "net.features.2"]]}},
    ]
    out = _distill(tmp_path, capsys, raw)
    client = MlflowClient(tracking_uri)
    history = {k for k in client.get_run(out["runs"]["student"]).data.metrics}
    assert {"train_loss_kd", "train_loss_hint", "train_loss_attention", "train_loss_ce"} <= history
    assert client.get_run(out["runs"]["student"]).data.params["loss.0"] == "hint*0.5"
    # the registered student is the plain CNN: no connector parameters came along
    loaded = mlflow.pytorch.load_model(f"models:/method-student/{out['registered']['version']}")
    assert sum(p.numel() for p in loaded.parameters()) == out["student"]["param_count"]


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"student": "net.9", "teacher": "net.head.2"}, ["'net.9'", "net.0, net.1, net.2"]),  # lists real paths
        ({"student": "net.1", "teacher": "net.features.2"}, ["(16,)", "(8, 8, 8)"]),  # names both shapes
    ],
)
def test_bad_tap_is_a_config_error(tmp_path, capsys, tracking_uri, params, expected):
    raw = _raw(tracking_uri, tmp_path)
    raw["teacher"]["epochs"] = 1
    raw["distill"].update(method="hint", params=params)
    err = _config_error(tmp_path, capsys, raw)
    assert all(text in err for text in expected), err


def test_unknown_loss_params_are_config_errors(tmp_path, capsys, tracking_uri):
    raw = _raw(tracking_uri, tmp_path)
    raw["distill"].update(method="dkd", params={"beta": 8})
    err = _config_error(tmp_path, capsys, raw)
    assert "distill.params.beta" in err and "unknown key" in err


@pytest.mark.slow
def test_teacher_cache_miss_then_hit_and_bypass_under_augmentation(tmp_path, capsys, tracking_uri, teacher_uri):
    raw = _raw(tracking_uri, tmp_path)
    raw["teacher"] = {"uri": teacher_uri}
    client = MlflowClient(tracking_uri)
    first = _distill(tmp_path, capsys, raw)
    second = _distill(tmp_path, capsys, raw)
    tags = [client.get_run(o["runs"]["student"]).data.tags for o in (first, second)]
    assert tags[0]["kd_ops.teacher_cache"] == "miss" and tags[1]["kd_ops.teacher_cache"] == "hit"
    assert tags[0]["kd_ops.teacher_cache_key"] == tags[1]["kd_ops.teacher_cache_key"]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # same inputs, same teacher outputs, same seed: the cached run trains the same student
    assert second["student"]["test_accuracy"] == pytest.approx(first["student"]["test_accuracy"])
    third = _distill(tmp_path, capsys, raw, "distill.mixup=0.4")
    assert client.get_run(third["runs"]["student"]).data.tags["kd_ops.teacher_cache"] == "bypassed: augmentation"
    # a change of the transfer set is a new key
    fourth = _distill(tmp_path, capsys, raw, "data.train_fraction=0.5")
    assert client.get_run(fourth["runs"]["student"]).data.tags["kd_ops.teacher_cache"] == "miss"


@pytest.mark.slow
def test_born_again_generations_are_a_chain_of_nested_runs(tmp_path, capsys, tracking_uri, teacher_uri):
    raw = _raw(tracking_uri, tmp_path)
    raw["teacher"] = {"uri": teacher_uri}
    raw["distill"].update(method="born_again", params={"generations": 3})
    out = _distill(tmp_path, capsys, raw)
    client = MlflowClient(tracking_uri)
    parent = out["runs"]["student"]
    for gen in (1, 2, 3):
        runs = client.search_runs(
            [client.get_run(parent).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`kd_ops.generation` = '{gen}'",
        )
        assert len(runs) == 1, f"generation {gen} must be nested in the run that taught it"
        assert runs[0].data.tags[TAG_ROLE] == "generation"
        assert "test_accuracy" in runs[0].data.metrics
        parent = runs[0].info.run_id


@pytest.mark.slow
def test_multi_teacher_runs_nest_under_teacher(tmp_path, capsys, tracking_uri, teacher_uri):
    raw = _raw(tracking_uri, tmp_path)
    raw["teacher"] = {"uri": teacher_uri}
    raw["teachers"] = [{"model": "mlp", "params": {"hidden": [16]}, "epochs": 1}]
    raw["distill"].update(combine="weights", teacher_weights=[0.7, 0.3])
    out = _distill(tmp_path, capsys, raw)
    client = MlflowClient(tracking_uri)
    members = client.search_runs(
        [client.get_run(out["runs"]["teacher"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{out['runs']['teacher']}'",
    )
    assert sorted(r.info.run_name for r in members) == ["teacher-0", "teacher-1"]
    uris = client.get_run(out["runs"]["teacher"]).data.tags[TAG_TEACHER_URI].split(",")
    assert uris[0] == teacher_uri and uris[1].startswith("models:/")
    assert client.get_run(out["runs"]["teacher"]).data.params["combine"] == "weights"


def test_teacher_weights_must_fit_the_teachers(tmp_path, capsys, tracking_uri):
    raw = _raw(tracking_uri, tmp_path)
    raw["teachers"] = [{"model": "mlp"}]
    raw["distill"].update(combine="weights", teacher_weights=[1.0])
    assert "distill.teacher_weights = [1.0]" in _config_error(tmp_path, capsys, raw)


@pytest.mark.slow
def test_sklearn_student_registered_and_served_by_pyfunc(
    distilled, tmp_path, capsys, tracking_uri, teacher_uri, monkeypatch
):
    raw = _raw(tracking_uri, tmp_path)
    raw["teacher"] = {"uri": teacher_uri}
    raw["distill"].update(
        method="sklearn", baseline=True, params={"model": "decision_tree", "params": {"max_depth": 6}}
    )
    out = _distill(tmp_path, capsys, raw)
    assert set(COMMON_METRICS) <= set(out["baseline"]) and set(COMMON_METRICS) <= set(out["student"])
    _, first = distilled
    x, _ = first.datamodule.arrays("test")
    # MLflow's own loaders as a user outside kd-ops has them (kd-ops sets this false for its process).
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    model = mlflow.pyfunc.load_model(f"models:/method-student/{out['registered']['version']}")
    probs = np.asarray(model.predict(x[:10]))
    assert probs.shape == (10, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    sk = mlflow.sklearn.load_model(f"models:/method-student/{out['registered']['version']}")
    assert type(sk).__module__.startswith("sklearn."), "a plain scikit-learn model, loadable without kd-ops"


# -- units that need no training ----------------------------------------------------------------


def _np_softmax(z, t=1.0):
    z = z / t
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_mutual_loss_against_independent_computation_and_gradients():
    rng = np.random.default_rng(1)
    zs = [rng.normal(size=(5, 4)) * 2 for _ in range(3)]
    logits = [torch.tensor(z, requires_grad=True) for z in zs]
    t = 2.0
    loss = mutual_loss(logits, 0, t)
    ps = [_np_softmax(z, t) for z in zs]
    expected = np.mean([(ps[j] * (np.log(ps[j]) - np.log(ps[0]))).sum(1).mean() for j in (1, 2)]) * t * t
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert logits[0].grad is not None and logits[1].grad is None and logits[2].grad is None


@pytest.mark.parametrize("combine", ["average", "weights", "confidence"])
def test_teacher_ensemble_combines_probabilities(combine):
    torch.manual_seed(0)
    members = [torch.nn.Linear(3, 4) for _ in range(2)]
    ens = TeacherEnsemble(members, combine, [3.0, 1.0] if combine == "weights" else None)
    x = torch.randn(6, 3)
    with torch.no_grad():
        got = ens(x).exp().numpy()
        p = np.stack([_np_softmax(m(x).numpy()) for m in members])
    if combine == "average":
        expected = p.mean(0)
    elif combine == "weights":
        expected = 0.75 * p[0] + 0.25 * p[1]
    else:
        conf = p.max(2)
        w = conf / conf.sum(0, keepdims=True)
        expected = (w[..., None] * p).sum(0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
