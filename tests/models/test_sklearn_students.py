"""sklearn students fitted on soft targets: the expansion is exact, every kind learns from a real
teacher on digits, all C classes always come back, and the artefact pickles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.special import softmax
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from kd_ops.core.registry import UnknownComponentError
from kd_ops.models.sklearn_students import (
    SKLEARN_MODELS,
    SoftTargetClassifier,
    fit_soft,
    jitter_copies,
    sklearn_size,
    soft_to_weighted,
)

C = 10
KINDS = ("decision_tree", "gradient_boosting", "logistic_regression")
# Small enough to keep the file quick; still the real estimators.
FAST = {
    "decision_tree": {},
    "gradient_boosting": {"max_iter": 15},
    "logistic_regression": {"max_iter": 300},
}
FLOOR = {"decision_tree": 0.7, "gradient_boosting": 0.85, "logistic_regression": 0.85}


@pytest.fixture(autouse=True)
def _few_threads():
    # One thread: boosting and BLAS spin-wait badly when other work shares the cores.
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits():
    """A logistic-regression teacher on digits and its soft targets (T=2) on its training rows."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=900, stratify=y, random_state=0)
    with threadpool_limits(limits=1):
        teacher = LogisticRegression(max_iter=500).fit(x_tr, y_tr)
    probs = softmax(teacher.decision_function(x_tr) / 2.0, axis=1)
    assert (teacher.predict(x_te) == y_te).mean() > 0.93  # a good teacher, or the floors mean nothing
    return x_tr, y_tr, probs, x_te, y_te


def test_registry_has_the_three_kinds():
    assert SKLEARN_MODELS.names() == sorted(KINDS)


def test_soft_to_weighted_hand_made_example():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    probs = np.array([[0.7, 0.2995, 0.0005], [0.0, 0.0, 1.0]])
    x_rep, y_rep, w_rep = soft_to_weighted(x, probs, min_weight=1e-3)
    np.testing.assert_array_equal(x_rep, [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(y_rep, [0, 1, 2])
    np.testing.assert_allclose(w_rep, [0.7 / 0.9995, 0.2995 / 0.9995, 1.0])
    # With no threshold the 0.0005 class stays and weights are the probabilities themselves.
    _, y_all, w_all = soft_to_weighted(x, probs, min_weight=0.0)
    np.testing.assert_array_equal(y_all, [0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(w_all, [0.7, 0.2995, 0.0005, 0.0, 0.0, 1.0])


def test_soft_to_weighted_on_real_targets(digits):
    x, _, probs, _, _ = digits
    x_rep, y_rep, w_rep = soft_to_weighted(x, probs, min_weight=1e-3)
    rows = np.repeat(np.arange(len(x)), (probs >= 1e-3).sum(1))  # copies of a row are adjacent
    np.testing.assert_array_equal(x_rep, x[rows])
    np.testing.assert_allclose(np.bincount(rows, weights=w_rep), 1.0)
    assert (probs[rows, y_rep] >= 1e-3).all()
    assert len(y_rep) < probs.size  # the tail really was dropped
    kept_total = np.where(probs >= 1e-3, probs, 0.0).sum(1)
    np.testing.assert_allclose(w_rep, probs[rows, y_rep] / kept_total[rows])


def test_soft_to_weighted_keeps_argmax_and_rejects_bad_input():
    probs = np.full((2, 2000), 1 / 2000)  # every class under min_weight
    probs[1, 7] += 1e-4
    probs /= probs.sum(1, keepdims=True)
    _, y_rep, w_rep = soft_to_weighted(np.zeros((2, 3)), probs, min_weight=1e-3)
    np.testing.assert_array_equal(y_rep, [0, 7])
    np.testing.assert_allclose(w_rep, 1.0)
    with pytest.raises(ValueError, match="shape"):
        soft_to_weighted(np.zeros((3, 2)), probs)
    with pytest.raises(ValueError, match="non-negative"):
        soft_to_weighted(np.zeros((1, 2)), np.array([[1.2, -0.2]]))


@pytest.mark.parametrize("kind", KINDS)
def test_fit_soft_learns_from_the_teacher(digits, kind):
    x, _, probs, x_te, y_te = digits
    student = fit_soft(kind, FAST[kind], x, probs, seed=0)
    proba = student.predict_proba(x_te)
    assert proba.shape == (len(x_te), C)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(student.classes_, np.arange(C))
    accuracy = (student.predict(x_te) == y_te).mean()
    assert accuracy > FLOOR[kind], f"{kind}: held-out accuracy {accuracy:.3f}"
    assert student.score(x_te, y_te) == pytest.approx(accuracy)
    assert student.n_features_in_ == x.shape[1]


def test_logistic_student_agrees_with_teacher_on_transfer_rows(digits):
    x, _, probs, _, _ = digits
    student = fit_soft("logistic_regression", {}, x, probs, seed=0)
    assert (student.predict(x) == probs.argmax(1)).mean() > 0.9
    # It learned the soft targets, not just their argmax: probabilities are close on average.
    assert np.abs(student.predict_proba(x) - probs).sum(1).mean() < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_class_missing_from_transfer_set_still_has_its_column(digits, kind):
    x, y, probs, x_te, _ = digits
    # Rows of class 3 left out: the teacher may still put some mass on 3 elsewhere.
    keep = y != 3
    student = fit_soft(kind, FAST[kind], x[keep], probs[keep], seed=0)
    assert student.predict_proba(x_te).shape == (len(x_te), C)
    # And a teacher that never says 3: the inner estimator never sees label 3 at all.
    no3 = probs[keep].copy()
    no3[:, 3] = 0.0
    no3 /= no3.sum(1, keepdims=True)
    student = fit_soft(kind, FAST[kind], x[keep], no3, seed=0)
    assert 3 not in student.estimator_.classes_
    proba = student.predict_proba(x_te)
    assert proba.shape == (len(x_te), C)
    np.testing.assert_array_equal(proba[:, 3], 0.0)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert 3 not in student.predict(x_te)


def test_hard_labels_are_read_as_one_hot_and_one_class_is_refused(digits):
    x, y, _, x_te, y_te = digits
    student = SoftTargetClassifier(LogisticRegression(max_iter=300)).fit(x, y)
    assert student.predict_proba(x_te).shape[1] == C
    assert student.score(x_te, y_te) > 0.85
    with pytest.raises(ValueError, match="at least 2"):
        fit_soft("decision_tree", {}, x[:5], np.eye(C)[np.zeros(5, dtype=int)], seed=0)


def test_unknown_kind_names_the_known_ones(digits):
    x, _, probs, _, _ = digits
    with pytest.raises(UnknownComponentError) as err:
        fit_soft("random_forest", {}, x, probs, seed=0)
    for kind in KINDS:
        assert kind in str(err.value)


@pytest.mark.parametrize(
    "kind,params",
    [
        ("decision_tree", {"max_depth": -1}),
        ("decision_tree", {"max_dept": 4}),
        ("gradient_boosting", {"learning_rate": 0}),
        ("gradient_boosting", {"n_estimators": 10}),
        ("logistic_regression", {"C": -1.0}),
        ("logistic_regression", {"penalty": "l1"}),
    ],
)
def test_bad_params_are_validation_errors(digits, kind, params):
    x, _, probs, _, _ = digits
    with pytest.raises(ValidationError):
        fit_soft(kind, params, x, probs, seed=0)


def test_defaults_reach_the_estimators():
    built = {kind: SKLEARN_MODELS.get(kind).build(SKLEARN_MODELS.get(kind).params(), 5) for kind in KINDS}
    assert built["decision_tree"].get_params()["max_depth"] == 12
    assert built["decision_tree"].get_params()["min_samples_leaf"] == 1
    hgb = built["gradient_boosting"].get_params()
    assert (hgb["max_iter"], hgb["learning_rate"], hgb["max_leaf_nodes"]) == (100, 0.1, 31)
    assert hgb["early_stopping"] is False
    lr = built["logistic_regression"].get_params()
    assert (lr["C"], lr["max_iter"]) == (1.0, 500)
    assert all(est.get_params()["random_state"] == 5 for est in built.values())


def test_jitter_copies_shapes_and_determinism(digits):
    x = digits[0][:50]
    out = jitter_copies(x, copies=3, std=0.1, rng=np.random.default_rng(1), scale=4.0)
    assert out.shape == (200, x.shape[1]) and out.dtype == x.dtype
    np.testing.assert_array_equal(out[:50], x)
    again = jitter_copies(x, copies=3, std=0.1, rng=np.random.default_rng(1), scale=4.0)
    np.testing.assert_array_equal(out, again)
    other = jitter_copies(x, copies=3, std=0.1, rng=np.random.default_rng(2), scale=4.0)
    assert not np.array_equal(out[50:], other[50:])
    noise = out[50:] - np.tile(x, (3, 1))
    assert noise.std() == pytest.approx(0.4, rel=0.05)
    assert jitter_copies(x, copies=0, std=0.1, rng=np.random.default_rng(1)) is x
    with pytest.raises(ValueError):
        jitter_copies(x, copies=-1, std=0.1, rng=np.random.default_rng(1))


@pytest.mark.parametrize("kind", KINDS)
def test_student_pickles_and_has_a_size(digits, kind):
    x, _, probs, x_te, _ = digits
    student = fit_soft(kind, FAST[kind], x, probs, seed=0)
    restored = pickle.loads(pickle.dumps(student, protocol=5))
    np.testing.assert_array_equal(restored.predict_proba(x_te), student.predict_proba(x_te))
    size = sklearn_size(student)
    assert set(size) == {"param_count", "model_size_bytes"}
    assert all(isinstance(v, int) and v > 0 for v in size.values())
    assert size["model_size_bytes"] == len(pickle.dumps(student, protocol=5))
    inner = student.estimator_
    if kind == "logistic_regression":
        assert size["param_count"] == inner.coef_.size + inner.intercept_.size
    elif kind == "decision_tree":
        leaves = int((inner.tree_.children_left == -1).sum())
        assert size["param_count"] == 2 * (inner.tree_.node_count - leaves) + C * leaves
    else:
        assert size["param_count"] >= 15 * C  # at least one leaf per tree
    assert sklearn_size(inner)["param_count"] == size["param_count"]
