"""No code runs from a model file without consent (issue 14).

Crafted MLflow models, each of whose loading would run code (a marker file appears): a
scikit-learn model stored as a pickle, a PyTorch model stored as a pickle, a pt2 archive with one
weights record turned into a pickle (`use_pickle: true`), and a skops file holding a class that
the model's own MLmodel lists as trusted. Every way kd-ops loads a model refuses them in one
line naming the model and `--allow-pickle`, and the marker never appears; with consent they load
(so the payloads are real), and kd-ops' own pt2 and skops models load without it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import mlflow
import mlflow.pytorch
import mlflow.sklearn
import numpy as np
import pytest
import sklearn
import skops.io
import torch
import yaml
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from torch import nn

from kd_ops.cli.main import main
from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.loading import config_from_dict
from kd_ops.core.errors import ConfigError
from kd_ops.models.loading import load_model, load_torch_model
from kd_ops.models.sklearn_students import SoftTargetClassifier, fit_soft
from kd_ops.registry import tracking
from kd_ops.serving.served_model import load_version
from kd_ops.serving.shadow import ShadowScorer
from kd_ops.serving.state import ServerState, ServeSettings

from ..conftest import tiny_raw
from ..model_file_helpers import RunsCommand, WritesMarker

KINDS = ("sklearn-pickle", "torch-pickle", "pt2-pickled-weights", "skops-untrusted-type")
TORCH_KINDS = ("torch-pickle", "pt2-pickled-weights")


def _digits(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x[:n].astype(np.float32), y[:n]


# -- crafted models ----------------------------------------------------------------------------


def _sklearn_pickle(marker: Path, tmp: Path) -> str:
    x, y = _digits()
    est = LogisticRegression(max_iter=300).fit(x, y)
    est.payload = RunsCommand(f"touch {marker}")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(est, name="model", serialization_format="pickle", pip_requirements=["sk"])
    return info.model_uri


def _torch_pickle(marker: Path, tmp: Path) -> str:
    net = nn.Sequential(nn.Linear(64, 10))
    net.payload = RunsCommand(f"touch {marker}")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(net, name="model", serialization_format="pickle", pip_requirements=["torch"])
    return info.model_uri


def _log_dir(local: Path) -> str:
    """A model directory (MLmodel and files) logged as the artifacts of a run of its own."""
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(local), "model")
    return f"runs:/{run.info.run_id}/model"


def _pt2_pickled_weights(marker: Path, tmp: Path) -> str:
    """A real pt2 model as MLflow logs it, then one weights record rewritten into a pickle that
    calls os.system, with `use_pickle: true` in its payload config so torch.export.load unpickles it."""
    x, _ = _digits(5)
    with mlflow.start_run():
        info = tracking.log_torch_model(nn.Sequential(nn.Linear(64, 10)), x)
    local = tmp / "pt2-model"
    shutil.copytree(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri), local)
    archive = next(local.rglob("model.pt2"))
    payload = io.BytesIO()
    torch.save(RunsCommand(f"touch {marker}"), payload)
    rewritten = archive.with_suffix(".new")
    target = None
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as zout:
        for entry in zin.infolist():
            data = zin.read(entry)
            if entry.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"], target = True, first["path_name"]
                data = json.dumps(config).encode()
            zout.writestr(entry, data)
    with zipfile.ZipFile(rewritten) as zin, zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zout:
        for entry in zin.infolist():
            data = payload.getvalue() if entry.filename.endswith(f"data/weights/{target}") else zin.read(entry)
            zout.writestr(entry, data)
    rewritten.unlink()
    return _log_dir(local)


def _skops_untrusted_type(marker: Path, tmp: Path, payload=None, listed=None) -> str:
    """A skops file holding a class from outside scikit-learn (its __setstate__ writes the marker),
    with an MLmodel that lists that class in skops_trusted_types, as MLflow would pass to skops."""
    x, y = _digits()
    est = LogisticRegression(max_iter=300).fit(x, y)
    est.payload = WritesMarker(marker) if payload is None else payload
    local = tmp / f"skops-model-{marker.name}"
    local.mkdir()
    skops.io.dump(est, local / "model.skops")
    model = Model()
    model.add_flavor(
        "sklearn",
        pickled_model="model.skops",
        serialization_format="skops",
        sklearn_version=sklearn.__version__,
        skops_trusted_types=listed or skops.io.get_untrusted_types(file=local / "model.skops"),
        code=None,
    )
    mlflow.pyfunc.add_to_model(model, loader_module="mlflow.sklearn", model_path="model.skops")
    model.signature = infer_signature(x[:5], est.predict_proba(x[:5]))
    model.save(str(local / "MLmodel"))
    return _log_dir(local)


CRAFT = {
    "sklearn-pickle": _sklearn_pickle,
    "torch-pickle": _torch_pickle,
    "pt2-pickled-weights": _pt2_pickled_weights,
    "skops-untrusted-type": _skops_untrusted_type,
}


def _use(store: str) -> None:
    """This module's store for the runs a fixture or test logs (other modules move the global URI);
    kd-ops' use_experiment keeps the artifacts beside the database, not in ./mlruns."""
    mlflow.set_experiment(experiment_id=tracking.use_experiment(store, "crafted"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('model-loading')}/mlflow.db"


@pytest.fixture(autouse=True)
def _in_store(store):
    _use(store)


@pytest.fixture(scope="module")
def crafted(store, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """kind -> (model URI, marker path); also registered as `crafted-<kind>` with @champion."""
    _use(store)
    tmp = tmp_path_factory.mktemp("crafted")
    out = {}
    client = MlflowClient(store)
    for kind, craft in CRAFT.items():
        marker = tmp / f"marker-{kind}"
        uri = craft(marker, tmp)
        version = mlflow.register_model(uri, f"crafted-{kind}").version
        client.set_registered_model_alias(f"crafted-{kind}", "champion", version)
        out[kind] = (uri, marker)
    assert not any(m.exists() for _, m in out.values()), "crafting a model must not run its payload"
    return out


def _kd_ops_line(stderr: str) -> str:
    """kd-ops' own message among what the libraries print (download progress bars)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("kd-ops: ")][-1]


def _assert_refused(message: str, uri: str) -> None:
    assert "\n" not in message.strip(), f"one line, not:\n{message}"
    assert uri in message and "--allow-pickle" in message, message


# -- the loader itself -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_refuses_code_in_the_file(crafted, kind):
    uri, marker = crafted[kind]
    with pytest.raises(ConfigError) as err:
        load_model(uri)
    _assert_refused(str(err.value), uri)
    assert not marker.exists(), "the model's code ran"


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_load_torch_model_refuses_code_in_the_file(crafted, kind):
    uri, marker = crafted[kind]
    for module_tree in (False, True):
        with pytest.raises(ConfigError) as err:
            load_torch_model(uri, module_tree=module_tree)
        _assert_refused(str(err.value), uri)
    assert not marker.exists()


def test_the_reasons_are_named(crafted):
    messages = {}
    for kind in KINDS:
        with pytest.raises(ConfigError) as err:
            load_model(crafted[kind][0])
        messages[kind] = str(err.value)
    assert "stored with 'pickle'" in messages["sklearn-pickle"]
    assert "saved as a pickle" in messages["torch-pickle"]
    assert "pickled content" in messages["pt2-pickled-weights"] and "weights/weight_" in messages["pt2-pickled-weights"]
    # The class the model's own MLmodel lists as trusted is named, and not trusted.
    assert "tests.model_file_helpers.WritesMarker" in messages["skops-untrusted-type"]


def test_a_scikit_learn_function_is_not_a_trusted_type(store, tmp_path):
    """scikit-learn *classes* are trusted by name; a function (here one skops would call) is not,
    even though the model's MLmodel lists it."""
    from sklearn.preprocessing import FunctionTransformer, normalize

    uri = _skops_untrusted_type(tmp_path / "unused", tmp_path, payload=FunctionTransformer(func=normalize))
    with pytest.raises(ConfigError, match=r"sklearn\.preprocessing\._data\.normalize") as err:
        load_model(uri)
    _assert_refused(str(err.value), uri)


def test_mlflow_itself_refuses_pickle_in_a_kd_ops_process(crafted, monkeypatch):
    """kd-ops sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (where the user has not set it), so
    MLflow's own loaders in a kd-ops process do not unpickle either."""
    from mlflow.exceptions import MlflowException

    from kd_ops.core.env import apply_offline_defaults

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    apply_offline_defaults()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    uri, marker = crafted["sklearn-pickle"]
    with pytest.raises(MlflowException):
        mlflow.sklearn.load_model(uri)
    uri, marker2 = crafted["torch-pickle"]
    with pytest.raises(MlflowException):
        mlflow.pytorch.load_model(uri)
    assert not marker.exists() and not marker2.exists()


# -- consent -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_with_consent_the_payload_is_real(store, tmp_path, kind):
    """The crafted models are real attacks: with allow_pickle the code in the file runs. (Loading
    may then fail, as the payload replaced a weight; what matters is that it ran.)"""
    marker = tmp_path / "marker"
    uri = CRAFT[kind](marker, tmp_path)
    before = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    try:
        load_model(uri, allow_pickle=True)
    except Exception:  # noqa: BLE001 - the pt2 payload leaves no valid weight behind
        pass
    assert marker.exists(), f"{kind}: with consent the model's code should have run"
    assert os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") == before, "consent is for one load only"


@pytest.fixture(scope="module")
def benign_pickle(store) -> str:
    """A plain scikit-learn model stored as a pickle: trusted by whoever passes --allow-pickle."""
    _use(store)
    x, y = _digits(600)
    with mlflow.start_run():
        est = LogisticRegression(max_iter=500).fit(x, y)
        info = mlflow.sklearn.log_model(
            est,
            name="model",
            serialization_format="pickle",
            pip_requirements=["sk"],
            signature=infer_signature(x[:5], est.predict_proba(x[:5])),
            registered_model_name="benign-pickle",
        )
    return info.model_uri


@pytest.fixture(scope="module")
def own_pt2(store) -> str:
    """A network logged the way kd-ops logs its students and teachers (pt2)."""
    _use(store)
    x, _ = _digits(5)
    with mlflow.start_run():
        return tracking.log_torch_model(nn.Sequential(nn.Linear(64, 10)).eval(), x).model_uri


@pytest.fixture
def eval_config(tmp_path, store) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(store)))
    return path


def test_evaluate_allow_pickle_flag_loads_a_pickle_model(benign_pickle, eval_config, capsys):
    assert main(["evaluate", benign_pickle, "--config", str(eval_config)]) == 2
    _assert_refused(_kd_ops_line(capsys.readouterr().err), benign_pickle)
    assert main(["evaluate", benign_pickle, "--config", str(eval_config), "--allow-pickle", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["uri"] == benign_pickle and out["model"]["test_accuracy"] > 0.8


def test_allow_pickle_in_the_config_loads_a_pickle_model(benign_pickle, tmp_path, store, capsys):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(store, allow_pickle=True)))
    assert main(["evaluate", benign_pickle, "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["test_accuracy"] > 0.8
    assert isinstance(load_model(benign_pickle, allow_pickle=True), LogisticRegression)


def test_allow_pickle_is_recorded_but_not_part_of_the_recipe_hash():
    off, on = ExperimentConfig(), ExperimentConfig(allow_pickle=True)
    assert off.hash() == on.hash()
    assert off.flat()["allow_pickle"] is False and on.flat()["allow_pickle"] is True
    assert "code" in ExperimentConfig.model_fields["allow_pickle"].description


def test_allow_pickle_is_an_mlflow_param_of_the_run(distilled, tracking_uri):
    _, result = distilled
    assert MlflowClient(tracking_uri).get_run(result.runs["parent"]).data.params["allow_pickle"] == "False"


# -- kd-ops' own models ------------------------------------------------------------------------


def test_kd_ops_own_pt2_model_loads_pickle_free(store):
    x, _ = _digits(5)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    with mlflow.start_run():
        uri = tracking.log_torch_model(net, x).model_uri
    with torch.inference_mode():
        expected = net(torch.from_numpy(x))
        for model in (load_model(uri), load_torch_model(uri, module_tree=True)):
            torch.testing.assert_close(model(torch.from_numpy(x)), expected)


@pytest.mark.parametrize("kind", ["decision_tree", "gradient_boosting", "logistic_regression"])
def test_kd_ops_own_skops_students_load_pickle_free(store, kind, recwarn):
    x, y = _digits(400)
    params = {"gradient_boosting": {"max_iter": 5}}.get(kind, {})
    student = fit_soft(kind, params, x, np.eye(10)[y], seed=0)
    with mlflow.start_run():
        uri = tracking.log_sklearn_model(student, x).model_uri
    # Saving checks its input example by loading the model back: that must not be refused.
    assert not [w for w in recwarn if "Failed to validate serving input" in str(w.message)]
    loaded = load_model(uri)
    assert isinstance(loaded, SoftTargetClassifier)
    np.testing.assert_allclose(loaded.predict_proba(x[:20]), student.predict_proba(x[:20]))


# -- entry points ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kd_ops_evaluate_refuses_with_exit_2(crafted, own_pt2, eval_config, capsys, kind):
    uri, marker = crafted[kind]
    assert main(["evaluate", uri, "--config", str(eval_config)]) == 2
    err = _kd_ops_line(capsys.readouterr().err)
    assert err.startswith("kd-ops: model URI = ")
    _assert_refused(err, uri)
    # As --teacher beside a model kd-ops made.
    assert main(["evaluate", own_pt2, "--config", str(eval_config), "--teacher", uri]) == 2
    err = _kd_ops_line(capsys.readouterr().err)
    assert err.startswith("kd-ops: --teacher = ")
    _assert_refused(err, uri)
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_distill_teacher_uri_refused_before_training(crafted, store, tmp_path, capsys, kind):
    uri, marker = crafted[kind]
    experiment = f"refused-teacher-{kind}"
    raw = tiny_raw(store, teacher={"uri": uri}, tracking={"uri": store, "experiment": experiment})
    with pytest.raises(ConfigError) as err:
        from kd_ops.pipeline.distillation import run_distillation

        run_distillation(config_from_dict(raw, "refused"))
    message = str(err.value)
    assert message.startswith("teacher.uri = ") and "\n" not in message
    if kind in TORCH_KINDS:
        _assert_refused(message, uri)
    else:
        assert "not a PyTorch model" in message
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path)]) == 2
    assert uri in capsys.readouterr().err
    assert MlflowClient(store).get_experiment_by_name(experiment) is None, "no run may start"
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_serving_refuses_to_load_the_version(crafted, store, kind):
    uri, marker = crafted[kind]
    name = f"crafted-{kind}"
    with pytest.raises(ConfigError) as err:
        load_version(MlflowClient(store), name, "1", "champion")
    assert "\n" not in str(err.value) and "--allow-pickle" in str(err.value) and name in str(err.value)
    with pytest.raises(ConfigError, match="--allow-pickle"):
        ServerState.start(ServeSettings(name=name, tracking_uri=store, log_predictions=False))
    assert not marker.exists()


def test_kd_ops_serve_refuses_to_start(crafted, store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD_OPS_TOKEN", "test-token")
    uri, marker = crafted["pt2-pickled-weights"]
    argv = ["serve", "crafted-pt2-pickled-weights", "--tracking-uri", store, "--no-log", "--port", "0"]
    assert main(argv) == 2
    err = _kd_ops_line(capsys.readouterr().err)
    assert "--allow-pickle" in err and "pickled content" in err and "crafted-pt2-pickled-weights" in err
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_the_shadow_teacher_is_refused_too(crafted, kind):
    uri, marker = crafted[kind]
    shadow = ShadowScorer(1.0, None, teacher_uri=uri, seed=0)
    shadow.offer(None, ["row-1"], np.zeros((1, 64), dtype=np.float32))
    shadow.close()
    stats = shadow.stats()
    assert stats["failed_rows"] == 1 and stats["scored_rows"] == 0
    assert "--allow-pickle" in stats["last_error"] and uri in stats["last_error"]
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_mlflow_evaluator_refuses_a_crafted_teacher(crafted, own_pt2, kind):
    """The `distillation` evaluator loads the teacher from evaluator_config: pickle-free by default."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    x, y = _digits(50)
    frame = pd.DataFrame(x, columns=[f"px{i}" for i in range(64)]).assign(label=y)
    uri, marker = crafted[kind]
    with mlflow.start_run(), pytest.raises(MlflowException, match=r"evaluator_config\['allow_pickle'\] = True"):
        mlflow.models.evaluate(
            own_pt2,
            frame,
            targets="label",
            model_type="classifier",
            evaluators="distillation",
            evaluator_config={"teacher": uri, "latency_repeats": 2},
        )
    assert not marker.exists()


def test_mlflow_evaluator_allow_pickle_loads_a_pickle_teacher(benign_pickle, own_pt2):
    import pandas as pd

    x, y = _digits(50)
    frame = pd.DataFrame(x, columns=[f"px{i}" for i in range(64)]).assign(label=y)
    with mlflow.start_run():
        result = mlflow.models.evaluate(
            own_pt2,
            frame,
            targets="label",
            model_type="classifier",
            evaluators="distillation",
            evaluator_config={"teacher": benign_pickle, "allow_pickle": True, "latency_repeats": 2},
        )
    assert result.metrics["teacher_accuracy"] > 0.8


def test_serving_with_allow_pickle_loads_a_pickle_version(benign_pickle, store):
    with pytest.raises(ConfigError, match="--allow-pickle"):
        load_version(MlflowClient(store), "benign-pickle", "1", "champion")
    served = load_version(MlflowClient(store), "benign-pickle", "1", "champion", allow_pickle=True)
    assert served.n_features == 64 and served.n_classes == 10
    MlflowClient(store).set_registered_model_alias("benign-pickle", "champion", "1")
    settings = ServeSettings(name="benign-pickle", tracking_uri=store, log_predictions=False, allow_pickle=True)
    state = ServerState.start(settings)
    assert state.current.version == "1"


@pytest.mark.parametrize(
    "command", [["distill", "c.yaml"], ["evaluate", "m", "--config", "c.yaml"], ["redistill", "c.yaml"], ["serve", "n"]]
)
def test_every_loading_command_takes_allow_pickle(command):
    from kd_ops.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args([*command, "--allow-pickle"]).allow_pickle is True
    assert parser.parse_args(command).allow_pickle is False
