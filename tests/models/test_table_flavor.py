"""kd-ops' table model format: every inner format round-trips, and crafted files run no code.

A table model's data folder holds a schema (JSON) and a model over encoded rows: a pt2 network,
a skops estimator, LightGBM's text model or XGBoost's JSON model. Reading it must unpickle
nothing: a pt2 archive with a pickled record and a skops file with a class from outside
scikit-learn are refused unless the user consents, and no marker file appears.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io
import torch
from sklearn.tree import DecisionTreeClassifier

from kd_ops.config.training import DataConfig
from kd_ops.core.errors import ConfigError
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.models.estimators import BOOSTED_TEACHERS, EstimatorTeacher
from kd_ops.models.table_flavor import read_model_folder, write_model_folder
from kd_ops.models.zoo import build_model, freeze

from ..model_file_helpers import RunsCommand, WritesMarker


@pytest.fixture(scope="module")
def dm() -> DistillDataModule:
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame(
        {
            "plan": rng.choice(["basic", "pro", "max"], n),
            "usage": rng.gamma(2.0, 3.0, n),
            "months": rng.integers(1, 60, n),
            "paper": rng.random(n) < 0.5,
        }
    )
    frame["left"] = np.where((frame.usage < 4) & (frame.plan != "max"), "yes", "no")
    d = DistillDataModule(DataConfig(label="left"), 0, frame=frame)
    d.setup()
    return d


def _network(dm):
    torch.manual_seed(0)
    return freeze(build_model("mlp", {"hidden": [8]}, dm.input_shape, dm.n_classes, table=dm.schema))


def _boosted(name: str, dm):
    entry = BOOSTED_TEACHERS.get(name)
    (x, y), (xv, yv) = dm.arrays("train"), dm.arrays("val")
    return EstimatorTeacher(entry.build(entry.params.model_validate({"n_estimators": 20}), x, y, xv, yv, dm.schema, 0))


def _tree(dm):
    x, y = dm.arrays("train")
    return DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, y)


def _expected(model, x) -> np.ndarray:
    if isinstance(model, EstimatorTeacher):
        return model.probabilities(x)
    if isinstance(model, torch.nn.Module):
        with torch.inference_mode():
            return torch.softmax(model(torch.as_tensor(x)), 1).numpy()
    return model.predict_proba(x)


@pytest.mark.parametrize("kind", ["pt2", "skops", "lightgbm", "xgboost"])
def test_every_inner_format_round_trips_and_answers_raw_records(tmp_path, dm, kind):
    model = {"pt2": _network, "skops": _tree, "lightgbm": lambda d: _boosted("lightgbm", d),
             "xgboost": lambda d: _boosted("xgboost", d)}[kind](dm)
    x, _ = dm.arrays("test")
    folder = write_model_folder(model, dm.schema, tmp_path / "m", x)
    back = read_model_folder(folder)
    assert back.kind == kind and back.schema == dm.schema
    np.testing.assert_allclose(back.encoded_proba(x), _expected(model, x), rtol=1e-4, atol=1e-5)
    records = dm.table.frame.iloc[dm.splits.test]
    np.testing.assert_allclose(back.predict_proba(records), back.encoded_proba(x), rtol=1e-5, atol=1e-6)
    assert set(back.predict(records).tolist()) <= {"yes", "no"}


def test_a_crafted_skops_estimator_is_refused_and_runs_no_code(tmp_path, dm):
    marker = tmp_path / "marker"
    tree = _tree(dm)
    tree.payload = WritesMarker(marker)
    folder = write_model_folder(_tree(dm), dm.schema, tmp_path / "m", dm.arrays("val")[0])
    skops.io.dump(tree, folder / "estimator.skops")
    with pytest.raises(ConfigError, match=r"types kd-ops does not trust .*WritesMarker.*--allow-pickle"):
        read_model_folder(folder, "models:/crafted/1")
    assert not marker.exists()


def test_a_crafted_pt2_network_is_refused_and_runs_no_code(tmp_path, dm):
    marker = tmp_path / "marker"
    folder = write_model_folder(_network(dm), dm.schema, tmp_path / "m", dm.arrays("val")[0])
    archive = folder / "network.pt2"
    payload = io.BytesIO()
    torch.save(RunsCommand(f"touch {marker}"), payload)
    entries = {}
    with zipfile.ZipFile(archive) as zin:
        for entry in zin.infolist():
            entries[entry.filename] = zin.read(entry)
    target = None
    for name, data in entries.items():
        if name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"], target = True, first["path_name"]
            entries[name] = json.dumps(config).encode()
    assert target is not None
    for name in entries:
        if name.endswith(f"data/weights/{target}"):
            entries[name] = payload.getvalue()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zout:
        for name, data in entries.items():
            zout.writestr(name, data)
    with pytest.raises(ConfigError, match="pickled content"):
        read_model_folder(folder, "models:/crafted/2")
    assert not marker.exists()


def test_a_folder_that_is_not_a_table_model_is_one_error(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable kd-ops table model"):
        read_model_folder(tmp_path)
    Path(tmp_path / "meta.json").write_text(json.dumps({"format": "pickle"}))
    (tmp_path / "schema.json").write_text(json.dumps({"kd_ops_table_schema": 1, "label": "y", "classes": [0, 1],
                                                      "columns": []}))
    with pytest.raises(ConfigError, match="unknown kd-ops table model format 'pickle'"):
        read_model_folder(tmp_path)


def test_a_linear_student_reads_missing_values_and_categories_and_stays_pickle_free(tmp_path, dm):
    from kd_ops.models.sklearn_students import fit_soft

    x, y = dm.arrays("train")
    x = x.copy()
    x[::7, dm.schema.position("usage")] = np.nan  # logistic regression alone refuses NaN
    student = fit_soft("logistic_regression", {}, x, np.eye(2)[y], seed=0, schema=dm.schema)
    assert student.preprocessor is not None
    xt, yt = dm.arrays("test")
    assert (student.predict(xt) == yt).mean() > 0.7
    back = read_model_folder(write_model_folder(student, dm.schema, tmp_path / "m", xt), "models:/linear/1")
    np.testing.assert_allclose(back.encoded_proba(xt), student.predict_proba(xt), rtol=1e-6)
