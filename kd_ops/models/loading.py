"""Models back from MLflow, checked against the data they are about to see.

Every place that takes a model URI from a user (a teacher in a config, `kd-ops evaluate`, the
champion a gate compares with, the served version and its shadow teacher) goes through this
module, so a URI that does not resolve or a model whose input does not fit the dataset is one
clear `ConfigError`, never a stack trace from inside MLflow or torch.

Loading is pickle-free unless the caller passes `allow_pickle=True` (the `allow_pickle` config
key, `--allow-pickle` on the CLI): a model file is data from whoever could write to the tracking
server, and unpickling it runs whatever code it holds. So by default

- a `pt2` archive is checked for pickled records before `torch.export.load` (which unpickles with
  `weights_only=False`), with MLflow's own checker (`check_pt2_pickle_free`);
- a pickle-format PyTorch model (no `model.pt2`) and a pickle / cloudpickle scikit-learn model are
  refused, naming the opt-in;
- a skops model is read by `skops.io.load` with kd-ops' own list of trusted types (skops' defaults,
  kd-ops' classes, scikit-learn classes resolved by name), never the `skops_trusted_types` list in
  the model's own MLmodel file, which a crafted model could fill with anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from torch import nn

from kd_ops.core.errors import ConfigError, first_line
from kd_ops.models.safe_load import (  # noqa: F401 - re-exported: where callers have always found them
    KD_OPS_TRUSTED_TYPES,
    OPT_IN,
    check_pt2_pickle_free,
    load_skops_file,
    mlflow_pickle_allowed,
)
from kd_ops.models.zoo import freeze


def _local_copy(uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def _flavors(local: Path) -> dict[str, Any]:
    """The MLmodel's flavours, read with yaml.safe_load (an MLmodel is data too)."""
    mlmodel = local / "MLmodel"
    if not mlmodel.exists():
        return {}
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    return flavors if isinstance(flavors, dict) else {}


def _load_torch_local(local: Path, uri: str, module_tree: bool, allow_pickle: bool) -> nn.Module:
    import mlflow.pytorch

    flavors = _flavors(local)
    if flavors and "pytorch" not in flavors:
        raise ConfigError(f"{uri}: not a PyTorch model (its flavors are {sorted(flavors)})")
    exported = sorted(local.rglob("model.pt2"))
    if not exported:
        if not allow_pickle:
            raise ConfigError(
                f"{uri}: a PyTorch model saved as a pickle (no model.pt2), and unpickling it runs "
                f"whatever code the file holds; {OPT_IN}"
            )
        with mlflow_pickle_allowed():
            return mlflow.pytorch.load_model(str(local))
    if not allow_pickle:
        check_pt2_pickle_free(exported[0], uri)
    program = torch.export.load(str(exported[0]))
    return torch.export.unflatten(program) if module_tree else program.module()


def load_torch_model(uri: str, module_tree: bool = False, allow_pickle: bool = False) -> nn.Module:
    """An MLflow PyTorch model. A `pt2` one is a flat graph module (fast: what serving runs), or
    with `module_tree` its original module tree (`torch.export.unflatten`), which feature taps
    (hint, attention, embeddings of a named layer) need but which runs slower, op by op.

    Without `allow_pickle`, a pt2 archive with pickled records and a pickle-format model are
    refused (`ConfigError`): loading either runs code stored in the model file."""
    return _load_torch_local(_local_copy(uri), uri, module_tree, allow_pickle)


def _inside(local: Path, relative: Any, uri: str) -> Path:
    """The model file the MLmodel names, which must lie inside the model's own directory."""
    if not isinstance(relative, str) or not relative:
        raise ConfigError(f"{uri}: its MLmodel names no scikit-learn model file")
    path = (local / relative).resolve()
    if not path.is_relative_to(local.resolve()) or not path.is_file():
        raise ConfigError(f"{uri}: its MLmodel names {relative!r}, which is not a file inside the model")
    return path


def _load_sklearn_local(local: Path, conf: dict[str, Any], uri: str, allow_pickle: bool) -> Any:

    conf = conf if isinstance(conf, dict) else {}
    fmt = conf.get("serialization_format", "pickle")  # MLflow reads a flavour without one as pickle
    if fmt != "skops":
        if not allow_pickle:
            raise ConfigError(
                f"{uri}: a scikit-learn model stored with {fmt!r}, and unpickling it runs whatever code "
                f"the file holds; {OPT_IN}"
            )
        import mlflow.sklearn

        with mlflow_pickle_allowed():
            return mlflow.sklearn.load_model(str(local))
    path = _inside(local, conf.get("pickled_model"), uri)
    return load_skops_file(path, uri, allow_pickle, conf.get("skops_trusted_types") or [])


XGBOOST_CLASSES = {  # what an xgboost flavour's `model_class` may name: built, then filled by load_model
    "xgboost.core.Booster",
    "xgboost.sklearn.XGBClassifier",
}


def _load_lightgbm_local(local: Path, conf: dict[str, Any], uri: str, allow_pickle: bool) -> Any:
    """A LightGBM Booster saved as text loads as data; MLflow pickles the scikit-learn API ones."""
    conf = conf if isinstance(conf, dict) else {}
    path = _inside(local, conf.get("data"), uri)
    if path.suffix == ".skops":  # MLflow 3.17 saves the scikit-learn API (LGBMClassifier) with skops
        return load_skops_file(path, uri, allow_pickle, conf.get("skops_trusted_types") or [])
    if path.suffix in (".lgb", ".txt"):
        import lightgbm as lgb

        try:
            return lgb.Booster(model_file=str(path))
        except Exception as exc:  # noqa: BLE001 - LightGBMError for a file that is not a model
            raise ConfigError(f"{uri}: cannot read its LightGBM model: {first_line(exc)}") from None
    if not allow_pickle:
        raise ConfigError(
            f"{uri}: a LightGBM model MLflow stored as a pickle ({path.name}: its scikit-learn API saves so), and "
            f"unpickling it runs whatever code the file holds; {OPT_IN}. Logging the Booster "
            "(mlflow.lightgbm.log_model(model.booster_)) stores LightGBM's text format, which needs no opt-in"
        )
    import mlflow.lightgbm

    with mlflow_pickle_allowed():
        return mlflow.lightgbm.load_model(str(local))


def _load_xgboost_local(local: Path, conf: dict[str, Any], uri: str) -> Any:
    """XGBoost's own JSON/UBJ model format: data, read by a class built here, never unpickled."""
    conf = conf if isinstance(conf, dict) else {}
    path = _inside(local, conf.get("data"), uri)
    name = conf.get("model_class", "xgboost.core.Booster")
    if name not in XGBOOST_CLASSES:
        raise ConfigError(
            f"{uri}: its xgboost model class {name!r} is not one kd-ops reads ({sorted(XGBOOST_CLASSES)})"
        )
    try:
        import xgboost as xgb
    except ImportError:
        raise ConfigError(f"{uri}: an XGBoost model; install XGBoost (pip install 'kd-ops[xgboost]')") from None
    model = xgb.Booster() if name.endswith("Booster") else xgb.XGBClassifier()
    try:
        model.load_model(str(path))
    except Exception as exc:  # noqa: BLE001 - XGBoostError for a file that is not a model
        raise ConfigError(f"{uri}: cannot read its XGBoost model: {first_line(exc)}") from None
    return model


def _load_pyfunc_local(local: Path, flavors: dict[str, Any], uri: str, allow_pickle: bool) -> Any:
    """Any other pyfunc model: MLflow loads it by unpickling its Python model or importing the
    module its MLmodel names, both code from the model's author, so only with consent."""
    if not allow_pickle:
        raise ConfigError(
            f"{uri}: a pyfunc model (flavors {sorted(flavors)}); loading it runs code the model names or "
            f"stores (a cloudpickled Python model or a loader module); {OPT_IN}"
        )
    import mlflow.pyfunc

    with mlflow_pickle_allowed():
        model = mlflow.pyfunc.load_model(str(local))
    try:
        raw = model.get_raw_model()
    except Exception:  # noqa: BLE001 - not every pyfunc has one
        raw = None
    return raw if hasattr(raw, "predict_proba") else model


def load_model(uri: str, allow_pickle: bool = False) -> Any:
    """A model that yields class probabilities, whichever flavour MLflow stored it in: a torch
    module, a scikit-learn estimator, a kd-ops table model (`TableModel`), a LightGBM or XGBoost
    model, or (with consent) any pyfunc model.

    Pickle-free unless `allow_pickle` (see the module docstring): a model whose loading would run
    code stored in it is a `ConfigError` naming the model and the opt-in."""
    return _load_local(_local_copy(uri), uri, allow_pickle)


def _load_local(local: Path, uri: str, allow_pickle: bool) -> Any:
    """`load_model` of a model already downloaded to `local`."""
    from kd_ops.models.table_flavor import is_table_model, read_model_folder

    flavors = _flavors(local)
    table = is_table_model(local)
    if table is not None:
        return read_model_folder(table, uri, allow_pickle)
    if "sklearn" in flavors:
        return _load_sklearn_local(local, flavors["sklearn"], uri, allow_pickle)
    if "pytorch" in flavors or not flavors:
        return _load_torch_local(local, uri, module_tree=False, allow_pickle=allow_pickle)
    if "lightgbm" in flavors:
        return _load_lightgbm_local(local, flavors["lightgbm"], uri, allow_pickle)
    if "xgboost" in flavors:
        return _load_xgboost_local(local, flavors["xgboost"], uri)
    if "python_function" in flavors:
        return _load_pyfunc_local(local, flavors, uri, allow_pickle)
    raise ConfigError(f"{uri}: its flavors are {sorted(flavors)}; none of them gives class probabilities")


def _probe(model: Any, rows: np.ndarray) -> np.ndarray:
    if isinstance(model, nn.Module):
        with torch.inference_mode():
            return freeze(model)(torch.as_tensor(rows, dtype=torch.float32)).numpy()
    return np.asarray(model.predict_proba(rows))


def for_table(model: Any, dm: Any, key: str, uri: str = "") -> Any:
    """A loaded model made to take this table's encoded rows: a network as it is; anything else
    (a kd-ops table model, a user's LightGBM, XGBoost or scikit-learn pipeline) behind an
    `EstimatorTeacher` that decodes the rows to the user's columns and lines up the classes."""
    from kd_ops.models.estimators import EstimatorTeacher, estimator_fingerprint
    from kd_ops.models.table_model import TableModel

    if isinstance(model, nn.Module):
        return model
    if isinstance(model, TableModel) and model.schema.same_encoding(dm.schema):
        # A kd-ops table model of this very encoding (a teacher or champion distilled on these
        # data): it reads the encoded rows as they are, with no decoding to records and back.
        # `schema` stays on the returned model: re-distillation checks a champion's encoding by it.
        if isinstance(model.inner, nn.Module):
            model.inner.schema = model.schema
            return model.inner
        fingerprint = estimator_fingerprint(model.inner)
        return EstimatorTeacher(model.inner, schema=model.schema, fingerprint=fingerprint, name=uri, where=key)
    fingerprint = estimator_fingerprint(model)
    if uri:
        import hashlib

        fingerprint = hashlib.sha256((fingerprint + uri).encode()).hexdigest()
    return EstimatorTeacher(
        model, dm.schema.classes, dm.schema, takes_frame=True, fingerprint=fingerprint, name=uri, where=key
    )


def _data_key(dm: Any) -> str:
    """How an error names the data: the config key that chose it."""
    cfg = dm.cfg
    if cfg.path is not None:
        return f"data.path = {cfg.path!r}"
    if getattr(dm, "frame", None) is not None:
        return "the DataFrame given as data"
    return f"data.name = {cfg.name!r}"


def load_for_data(uri: str, dm: Any, key: str, torch_only: bool = False, allow_pickle: bool = False) -> Any:
    """Load `uri` and check it maps this dataset's rows to its classes; `key` names the setting in errors.

    `torch_only` is for teachers of images: a PyTorch model with its module tree, so layers can be
    tapped. On a table any flavour that gives probabilities is taken (`for_table`); a PyTorch one
    keeps its module tree. `allow_pickle` is the user's consent to run code stored in the model file
    (a pickle model, a pt2 archive with pickled records, skops types kd-ops does not trust, a pyfunc
    model); without it such a model is a `ConfigError` naming `key`, the URI and the opt-in.
    """
    table = getattr(dm, "schema", None) is not None
    try:
        if table:
            local = _local_copy(uri)  # once: the flavour decides how it loads
            if "pytorch" in _flavors(local) and torch_only:
                model = _load_torch_local(local, uri, module_tree=True, allow_pickle=allow_pickle)
            else:
                model = _load_local(local, uri, allow_pickle)
            model = for_table(model, dm, key, uri)
        elif torch_only:
            model = load_torch_model(uri, module_tree=True, allow_pickle=allow_pickle)
        else:
            model = load_model(uri, allow_pickle=allow_pickle)
    except ConfigError as exc:
        raise ConfigError(f"{key} = {exc}") from None
    except Exception as exc:  # MLflow raises several types for a URI that does not resolve
        kind = "a PyTorch model" if torch_only and not table else "a model"
        raise ConfigError(f"{key} = {uri!r}: cannot load it as {kind}: {first_line(exc)}") from None
    try:
        out = _probe(model, dm.arrays("val")[0][:2])
    except ConfigError as exc:
        raise ConfigError(f"{key} = {uri!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            f"{key} = {uri!r}: the model does not accept rows of {dm.n_features} features "
            f"from {_data_key(dm)}: {first_line(exc)}"
        ) from None
    if out.ndim != 2 or out.shape[1] != dm.n_classes:
        raise ConfigError(
            f"{key} = {uri!r}: the model outputs shape {tuple(out.shape)}, "
            f"expected (batch, {dm.n_classes}) for {_data_key(dm)}"
        )
    return model
