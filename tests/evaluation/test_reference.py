"""The reference stored with each distilled student: what the monitors compare production with."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from kd_ops.evaluation.reference import Reference, ReferenceMissing, load_reference


def test_a_distilled_version_carries_its_reference(distilled, tracking_uri):
    cfg, result = distilled
    reg = result.registered
    ref = load_reference(reg["name"], reg["version"], tracking_uri)
    x_val, y_val = result.datamodule.arrays("val")
    assert ref.split == "val" and ref.x.shape == x_val.shape and ref.x.dtype == np.float32
    np.testing.assert_array_equal(ref.labels, y_val)
    np.testing.assert_allclose(ref.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert set(ref.slices) == {"ink"} and set(ref.slices["ink"]) <= {"low", "mid", "high"}

    # The student's probabilities are the registered model's, the teacher's the teacher run's.
    mlflow.set_tracking_uri(tracking_uri)
    logits = mlflow.pyfunc.load_model(f"models:/{reg['name']}/{reg['version']}").predict(x_val.astype(np.float32))
    assert (ref.predicted == np.asarray(logits).argmax(axis=1)).all()
    teacher_pred = result.models["teacher"](__import__("torch").as_tensor(x_val)).argmax(1).numpy()
    assert (ref.teacher_probabilities.argmax(axis=1) == teacher_pred).all()
    assert 0.0 < ref.accuracy <= 1.0


def test_round_trip_without_pickle(tmp_path):
    ref = Reference(
        x=np.random.rand(4, 3).astype(np.float32),
        labels=np.array([0, 1, 2, 1]),
        probabilities=np.full((4, 3), 1 / 3, dtype=np.float32),
        slices={"ink": np.array(["low", "mid", "high", "low"])},
    )
    ref.save(tmp_path / "r.npz")
    back = Reference.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.x, ref.x)
    assert back.teacher_probabilities is None and back.slices["ink"].tolist() == ["low", "mid", "high", "low"]


def test_a_version_without_reference_is_named(tracking_uri):
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(tracking_uri)
    est = LogisticRegression().fit(np.random.rand(20, 3), np.arange(20) % 2)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            est, name="m", registered_model_name="no-reference", serialization_format="skops", skops_trusted_types=[]
        )
    version = str(info.registered_model_version)
    with pytest.raises(ReferenceMissing, match=f"no-reference v{version} has no stored reference"):
        load_reference("no-reference", version, tracking_uri)
    with pytest.raises(ReferenceMissing, match="has no version 99"):
        load_reference("no-reference", "99", tracking_uri)
