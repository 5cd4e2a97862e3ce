"""scikit-learn students: a tree, boosted trees or a linear model fitted on a teacher's soft targets.

A neural teacher's value in distillation is its soft targets (class probabilities at a
temperature), not its hard labels: they say which wrong classes are nearly right. Most sklearn
classifiers only take hard labels, but nearly all take `sample_weight`, so each transfer row is
expanded into one weighted row per plausible class (`soft_to_weighted`). The fitted estimator is
wrapped in `SoftTargetClassifier`, which always answers with all C classes in order 0..C-1 (a
class absent from the transfer set still gets its, zero, column) and pickles, which is what
MLflow's sklearn flavour stores.

Entries mirror the network zoo in `kd_ops.models.zoo`: a name, a pydantic params schema (a typo in
the YAML is a config error naming the key) and a builder `(params, seed) -> estimator`.
Students see the same raw feature rows a client sends; none of these three needs scaled inputs
to work (trees are scale-free; lbfgs copes with pixel ranges), so no normaliser is attached.
"""

from __future__ import annotations

import pickle
from typing import Any, Literal

import numpy as np
from pydantic import Field
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.validation import check_is_fitted

from kd_ops.core.registry import Entry, Registry, entry_decorator
from kd_ops.models.zoo import Params

SKLEARN_MODELS: Registry[Entry] = Registry("sklearn model")


def register_sklearn_model(name: str, params: type[Params]):
    return entry_decorator(SKLEARN_MODELS, name, params)


class DecisionTreeParams(Params):
    # Bounded by default: an unbounded tree on a jittered transfer set memorises the noise and
    # grows to thousands of nodes, which defeats the point of a small student.
    max_depth: int = Field(12, ge=1, le=64)
    min_samples_leaf: int = Field(1, ge=1)
    criterion: Literal["gini", "entropy", "log_loss"] = "gini"


@register_sklearn_model("decision_tree", DecisionTreeParams)
def build_decision_tree(p: DecisionTreeParams, seed: int) -> DecisionTreeClassifier:
    return DecisionTreeClassifier(
        max_depth=p.max_depth, min_samples_leaf=p.min_samples_leaf, criterion=p.criterion, random_state=seed
    )


class GradientBoostingParams(Params):
    max_iter: int = Field(100, ge=1, le=10_000)
    learning_rate: float = Field(0.1, gt=0, le=1)
    max_leaf_nodes: int = Field(31, ge=2, le=4096)
    max_depth: int | None = Field(None, ge=1)
    min_samples_leaf: int = Field(20, ge=1)
    l2_regularization: float = Field(0.0, ge=0)
    # Off by default: sklearn would hold out a slice of the *expanded* rows, whose sibling rows
    # (same x, other classes) stay in training, so the stopping signal is optimistic. It also
    # switches on by itself above 10k rows under 'auto', which would make runs differ by size.
    early_stopping: bool = False


@register_sklearn_model("gradient_boosting", GradientBoostingParams)
def build_gradient_boosting(p: GradientBoostingParams, seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        max_iter=p.max_iter,
        learning_rate=p.learning_rate,
        max_leaf_nodes=p.max_leaf_nodes,
        max_depth=p.max_depth,
        min_samples_leaf=p.min_samples_leaf,
        l2_regularization=p.l2_regularization,
        early_stopping=p.early_stopping,
        random_state=seed,
    )


class LogisticRegressionParams(Params):
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(500, ge=1, le=100_000)


@register_sklearn_model("logistic_regression", LogisticRegressionParams)
def build_logistic_regression(p: LogisticRegressionParams, seed: int) -> LogisticRegression:
    # lbfgs fits the multinomial (softmax) model, the one whose loss the soft targets match.
    return LogisticRegression(C=p.C, max_iter=p.max_iter, solver="lbfgs", random_state=seed)


def soft_to_weighted(
    x: np.ndarray, probs: np.ndarray, min_weight: float = 1e-3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand soft targets into hard-labelled weighted rows: (X_rep, y_rep, w_rep).

    Row i becomes one copy per class c with probs[i, c] >= min_weight, labelled c and weighted
    probs[i, c], renormalised over the kept classes so every original row weighs 1 in total.
    Why this works: for a probabilistic model q, sum_c p_c * (-log q_c(x)) is both the
    cross-entropy against the soft target p and the weighted log-loss of the expanded rows, so
    logistic regression (or boosting's log-loss) fitted on them is fitted on the soft targets.
    A tree's leaf then holds the weighted class mix of its rows, i.e. the mean soft target.
    Per-row weights summing to 1 keep the total weight at n, so regularisation (C) means what it
    means for a hard-label fit on the same rows.

    min_weight drops the long tail of near-zero classes, which would multiply the row count by
    C for almost no signal; the row's most probable class is always kept, so no row vanishes
    (that only matters when C > 1 / min_weight). Copies of a row are adjacent in the output.
    Note that count-based settings (min_samples_leaf) count expanded rows, not original ones.
    """
    from scipy import sparse

    x = x if sparse.issparse(x) else np.asarray(x)  # TF-IDF features of texts stay sparse
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != x.shape[0]:
        raise ValueError(f"probs must be (n_rows, n_classes) with n_rows={x.shape[0]}, got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative")
    keep = probs >= min_weight
    keep[np.arange(len(probs)), probs.argmax(1)] = True
    kept = np.where(keep, probs, 0.0)
    totals = kept.sum(1)
    if (totals <= 0).any():
        raise ValueError(f"{int((totals <= 0).sum())} row(s) of probs are all zero")
    rows, labels = np.nonzero(keep)
    weights = kept[rows, labels] / totals[rows]
    return x[rows], labels.astype(np.int64), weights


class SoftTargetClassifier(ClassifierMixin, BaseEstimator):
    """Any sample_weight-taking sklearn classifier, fitted on soft targets over C classes.

    `fit(X, probs)` takes an (n, C) probability matrix (a 1-D vector of integer labels 0..C-1 is
    read as one-hot); C comes from its width, so `classes_` is arange(C) and `predict_proba`
    always has C columns in that order, even for a class that no row ever puts above
    min_weight (the inner estimator never saw it; its column is zero). `score(X, y)` takes hard
    labels, as for any sklearn classifier. The fitted inner model is `estimator_`, a clone of
    `estimator`. Module-level and plain attributes, so it pickles (MLflow's sklearn flavour).
    """

    def __init__(self, estimator: BaseEstimator, min_weight: float = 1e-3, preprocessor: Any = None):
        """`preprocessor`: an unfitted transformer put in front of the estimator (fitted on the
        transfer rows): how a linear student reads a table's encoded rows (`table_preprocessor`)."""
        self.estimator = estimator
        self.min_weight = min_weight
        self.preprocessor = preprocessor

    def fit(self, X: np.ndarray, y: np.ndarray) -> SoftTargetClassifier:
        X = np.asarray(X)
        y = np.asarray(y)
        if y.ndim == 1:
            labels = y.astype(np.int64)
            if labels.size and labels.min() < 0:
                raise ValueError("hard labels must be integers 0..C-1")
            y = np.eye(int(labels.max()) + 1 if labels.size else 0)[labels]
        if self.preprocessor is not None:
            self.preprocessor_ = clone(self.preprocessor).fit(X)
            X = self.preprocessor_.transform(X)
        x_rep, y_rep, w_rep = soft_to_weighted(X, y, self.min_weight)
        present = np.unique(y_rep)
        if len(present) < 2:
            # Every estimator here needs two classes; a one-class student is no student anyway.
            raise ValueError(f"soft targets put weight on {len(present)} class(es) only; need at least 2")
        self.estimator_ = clone(self.estimator).fit(x_rep, y_rep, sample_weight=w_rep)
        self.classes_ = np.arange(y.shape[1])
        self.n_features_in_ = np.asarray(X).shape[1] if self.preprocessor is None else self.preprocessor_.n_features_in_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        X = np.asarray(X)
        prep = getattr(self, "preprocessor_", None)  # models saved before kd-ops 0.2 have none
        inner = self.estimator_.predict_proba(prep.transform(X) if prep is not None else X)
        out = np.zeros((inner.shape[0], len(self.classes_)), dtype=np.float64)
        out[:, self.estimator_.classes_.astype(np.int64)] = inner
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


class TokenTfidf(TransformerMixin, BaseEstimator):
    """TF-IDF of a text column's token-id block (`kd_ops.data.text`): each row's non-pad ids
    are its words, so scikit-learn's `TfidfVectorizer` counts subword tokens and, with
    `ngram_range`, their bigrams. The tokenizer already ran (it travels in the table schema), so
    the vectorizer splits on spaces only. Sparse output."""

    def __init__(self, ngram_range: tuple[int, int] = (1, 2), min_df: int = 2, max_features: int | None = 100_000):
        self.ngram_range = ngram_range
        self.min_df = min_df
        self.max_features = max_features

    @staticmethod
    def _documents(X: Any) -> list[str]:
        ids = np.nan_to_num(np.asarray(X, dtype=np.float32)).astype(np.int64)
        return [" ".join(str(t) for t in row if t) for row in ids]

    def fit(self, X: Any, y: Any = None) -> "TokenTfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer_ = TfidfVectorizer(
            token_pattern=r"\S+",
            lowercase=False,
            ngram_range=tuple(self.ngram_range),
            min_df=self.min_df,
            max_features=self.max_features,
            sublinear_tf=True,
        ).fit(self._documents(X))
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X: Any) -> Any:
        check_is_fitted(self, "vectorizer_")
        return self.vectorizer_.transform(self._documents(X))


def table_preprocessor(schema: Any) -> Any:
    """What a linear model needs of a table's encoded rows, which hold NaN for missing values and
    category indices: numeric and boolean columns imputed with the training mean and scaled,
    categories one-hot encoded (missing and unseen: no column set), texts as TF-IDF of their
    tokens and token bigrams (`TokenTfidf`; the output is then sparse). Trees take the rows as
    they are, unless the table has text."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    dense = sorted(schema.offset(j) for j in schema.of_kind("numeric") + schema.of_kind("boolean"))
    cats = [schema.offset(j) for j in schema.of_kind("categorical")]
    texts = [list(range(schema.span(j).start, schema.span(j).stop)) for j in schema.of_kind("text")]
    parts = []
    if dense:
        parts.append(("dense", make_pipeline(SimpleImputer(strategy="mean"), StandardScaler()), dense))
    if cats:
        codes = SimpleImputer(strategy="constant", fill_value=-1.0)
        # dtype by name: skops stores a numpy type object as a type it does not trust by default
        onehot = OneHotEncoder(handle_unknown="ignore", dtype="float64")
        parts.append(("categories", make_pipeline(codes, onehot), cats))
    for k, columns in enumerate(texts):
        parts.append((f"text_{k}", TokenTfidf(), columns))
    return ColumnTransformer(parts, sparse_threshold=1.0 if texts else 0.0)


def _takes_missing(estimator: BaseEstimator) -> bool:
    from sklearn.utils import get_tags

    return bool(get_tags(estimator).input_tags.allow_nan)


def fit_soft(
    kind: str,
    params: dict[str, Any] | None,
    x: np.ndarray,
    probs: np.ndarray,
    seed: int,
    min_weight: float = 1e-3,
    schema: Any = None,
) -> SoftTargetClassifier:
    """Build the registered `kind` from validated `params` and fit it on the soft targets `probs`.

    Raises UnknownComponentError (listing the known kinds) for an unknown kind and pydantic's
    ValidationError for bad params, before any fitting starts.
    """
    entry = SKLEARN_MODELS.get(kind)
    estimator = entry.build(entry.params.model_validate(params or {}), seed)
    return soft_classifier(estimator, min_weight, schema).fit(x, probs)


def soft_classifier(estimator: BaseEstimator, min_weight: float, schema: Any = None) -> SoftTargetClassifier:
    """The soft-target wrapper of `estimator`; on a table (`schema`), with `table_preprocessor` in
    front when the estimator cannot take missing values (logistic regression)."""
    needs = schema is not None and (schema.has_text or not _takes_missing(estimator))
    if needs and schema.has_text:
        from sklearn.utils import get_tags

        from kd_ops.core.errors import ConfigError

        if not get_tags(estimator).input_tags.sparse:
            raise ConfigError(
                f"distill.params.model: {type(estimator).__name__} takes no sparse input, and a table with text "
                "reaches a scikit-learn student as sparse TF-IDF features: use logistic_regression"
            )
    prep = table_preprocessor(schema) if needs else None
    return SoftTargetClassifier(estimator, min_weight=min_weight, preprocessor=prep)


def jitter_copies(x: np.ndarray, copies: int, std: float, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """x followed by `copies` noisy copies of it, noise N(0, (std * scale)^2) per value.

    A small transfer set leaves a tree or boosted student with gaps between rows where the
    teacher was never asked; noisy copies, labelled by the teacher afterwards (the caller does
    that), fill them in. `scale` puts `std` in data units, e.g. the training split's feature std,
    so `std` itself reads as a fraction of it. copies=0 returns x itself; the output keeps
    x's float dtype, and the same seeded rng gives the same rows.
    """
    if copies < 0 or std < 0:
        raise ValueError(f"copies and std must be >= 0, got copies={copies}, std={std}")
    x = np.asarray(x)
    if copies == 0:
        return x
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    noise = rng.normal(0.0, std * scale, size=(copies, *x.shape))
    return np.concatenate([x, (x[None] + noise).reshape(-1, *x.shape[1:])]).astype(dtype, copy=False)


def _tree_param_count(node_is_leaf: np.ndarray, leaf_values: int) -> int:
    leaves = int(node_is_leaf.sum())
    return 2 * (len(node_is_leaf) - leaves) + leaf_values * leaves


def sklearn_size(est: BaseEstimator) -> dict[str, int]:
    """param_count and model_size_bytes for a student, comparable in spirit to a network's.

    param_count counts the learned numbers a prediction reads, as a network's weights do:
    logistic regression, coef_.size + intercept_.size; a tree, 2 per split node (feature index
    and threshold) plus, per leaf, the values it stores (the class mix, one per class the tree
    saw, for a decision tree; one raw score for each of HistGradientBoosting's regression trees,
    summed over all iterations and classes via its private `_predictors`). Plain node counts
    would flatter trees against networks. model_size_bytes is the pickle (protocol 5) of `est`
    as given, wrapper included: what the MLflow sklearn artefact costs.
    A SoftTargetClassifier is unwrapped for param_count.
    """
    inner = est.estimator_ if isinstance(est, SoftTargetClassifier) else est
    check_is_fitted(inner)
    if isinstance(inner, LogisticRegression):
        count = int(inner.coef_.size + inner.intercept_.size)
    elif isinstance(inner, DecisionTreeClassifier):
        tree = inner.tree_
        count = _tree_param_count(tree.children_left == -1, int(np.prod(tree.value.shape[1:])))
    elif isinstance(inner, HistGradientBoostingClassifier):
        count = sum(
            _tree_param_count(predictor.nodes["is_leaf"].astype(bool), 1)
            for iteration in inner._predictors
            for predictor in iteration
        )
    else:
        raise TypeError(f"no size rule for {type(inner).__name__}")
    return {"param_count": count, "model_size_bytes": len(pickle.dumps(est, protocol=5))}


# -- pipeline entry points -------------------------------------------------------------------------


def distill_to_sklearn(
    p: Any,
    temperature: float,
    teacher: Any,
    dm: Any,
    seed: int,
    estimator: BaseEstimator | None = None,
    hard_share: float = 0.0,
) -> BaseEstimator:
    """Fit the configured sklearn student (`p`: the `sklearn` strategy's params) on the teacher's
    soft targets at `temperature` over the transfer set.

    Jittered copies of the transfer rows (`jitter_copies`) are labelled by the teacher too: a
    tree cannot generalise between rows it never saw, so the teacher fills the gaps. With
    `hard_labels` the same model is fitted on the true labels of the plain transfer set: the
    baseline, on the transfer rows that keep their labels only (`data.labelled_fraction`).
    `hard_share`: on rows with a label, that share of the target is the one-hot label and the rest
    the teacher's (`ce_weight / (ce_weight + kd_weight)`); unlabelled rows get the teacher's alone.
    `estimator`: the user's own (Python API), fitted instead of the named `p.model`.
    Returns the plain fitted estimator when it knows every class (so the registered
    model loads without kd-ops), the all-class wrapper otherwise.
    """
    import torch
    from threadpoolctl import threadpool_limits

    n_classes = dm.n_classes
    schema = getattr(dm, "schema", None)
    if p.hard_labels:
        x_fit, y = dm.arrays("labelled")
        probs = np.eye(n_classes)[y]
    else:
        x, _ = dm.arrays("transfer")
        if p.jitter_copies and getattr(dm, "schema", None) is not None:
            from kd_ops.core.errors import ConfigError

            raise ConfigError("distill.params.jitter_copies: noise on encoded table rows (category codes) is no table")
        _, std = dm.normalization()
        x_fit = jitter_copies(x, p.jitter_copies, p.jitter, np.random.default_rng(seed), scale=std)
        with torch.inference_mode():
            logits = torch.cat(
                [teacher(torch.as_tensor(x_fit[i : i + 1024], dtype=torch.float32)) for i in range(0, len(x_fit), 1024)]
            )
        probs = (logits.float() / temperature).softmax(1).numpy().astype(np.float64)
        if hard_share > 0:  # the true label where the row keeps one (the plain rows come first)
            rows, labelled = dm.rows("transfer"), dm.rows("labelled")
            has = np.isin(rows, labelled)
            onehot = np.eye(n_classes)[dm.raw.y[rows[has]]]
            probs[: len(rows)][has] = hard_share * onehot + (1 - hard_share) * probs[: len(rows)][has]
    with threadpool_limits(limits=1):  # sklearn's OpenMP threads fight torch's on a small machine
        if estimator is not None:
            model = soft_classifier(clone(estimator), p.min_weight, schema).fit(x_fit, probs)
        else:
            model = fit_soft(p.model, p.params, x_fit, probs, seed, p.min_weight, schema)
    inner = model.estimator_
    if model.preprocessor is None and np.array_equal(getattr(inner, "classes_", []), np.arange(n_classes)):
        return inner
    return model
