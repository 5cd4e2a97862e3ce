"""Models back from MLflow, checked against the data they are about to see.

Every place that takes a model URI from a user (a teacher in a config, `kd-ops evaluate`, the
champion a gate compares with) goes through `load_for_data`, so a URI that does not resolve or
a model whose input does not fit the dataset is one clear `ConfigError`, never a stack trace
from inside MLflow or torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from torch import nn

from kd_ops.config import ConfigError, first_line
from kd_ops.models import freeze


def _local_copy(uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def load_torch_model(uri: str, module_tree: bool = False) -> nn.Module:
    """An MLflow PyTorch model. A `pt2` one is a flat graph module (fast: what serving runs), or
    with `module_tree` its original module tree (`torch.export.unflatten`), which feature taps
    (hint, attention, embeddings of a named layer) need but which runs slower, op by op."""
    import mlflow.pytorch

    local = _local_copy(uri)
    exported = sorted(local.rglob("model.pt2"))
    if not exported:
        return mlflow.pytorch.load_model(str(local))
    # torch.export.load unpickles with weights_only=False: run MLflow's own pickle-free check of
    # the archive first (skipped only where the user allowed pickle for MLflow as a whole).
    from mlflow.pytorch import _is_pickle_deserialization_allowed, _validate_pt2_archive_is_pickle_free

    if not _is_pickle_deserialization_allowed():
        _validate_pt2_archive_is_pickle_free(str(exported[0]))
    program = torch.export.load(str(exported[0]))
    return torch.export.unflatten(program) if module_tree else program.module()


def load_model(uri: str) -> Any:
    """A torch module or a scikit-learn estimator, whichever flavor the MLflow model has."""
    local = _local_copy(uri)
    mlmodel = local / "MLmodel"
    flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {}) if mlmodel.exists() else {}
    if "sklearn" in flavors:
        import mlflow.sklearn

        return mlflow.sklearn.load_model(str(local))
    if "pytorch" in flavors or not flavors:
        return load_torch_model(str(local))
    raise ConfigError(f"model {uri!r} has flavors {sorted(flavors)}; kd-ops reads pytorch and sklearn models")


def _probe(model: Any, rows: np.ndarray) -> np.ndarray:
    if isinstance(model, nn.Module):
        with torch.inference_mode():
            return freeze(model)(torch.as_tensor(rows, dtype=torch.float32)).numpy()
    return np.asarray(model.predict_proba(rows))


def load_for_data(uri: str, dm: Any, key: str, torch_only: bool = False) -> Any:
    """Load `uri` and check it maps this dataset's rows to its classes; `key` names the setting in errors.

    `torch_only` is for teachers: a PyTorch model with its module tree, so layers can be tapped.
    """
    try:
        model = load_torch_model(uri, module_tree=True) if torch_only else load_model(uri)
    except ConfigError:
        raise
    except Exception as exc:  # MLflow raises several types for a URI that does not resolve
        kind = "a PyTorch model" if torch_only else "a model"
        raise ConfigError(f"{key} = {uri!r}: cannot load it as {kind}: {first_line(exc)}") from None
    try:
        out = _probe(model, dm.arrays("val")[0][:2])
    except Exception as exc:
        raise ConfigError(
            f"{key} = {uri!r}: the model does not accept rows of {dm.n_features} features "
            f"from data.name = {dm.cfg.name!r}: {first_line(exc)}"
        ) from None
    if out.ndim != 2 or out.shape[1] != dm.n_classes:
        raise ConfigError(
            f"{key} = {uri!r}: the model outputs shape {tuple(out.shape)}, "
            f"expected (batch, {dm.n_classes}) for data.name = {dm.cfg.name!r}"
        )
    return model
