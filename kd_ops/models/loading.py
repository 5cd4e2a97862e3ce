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

import importlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from torch import nn

from kd_ops.core.errors import ConfigError, first_line
from kd_ops.models.zoo import freeze

OPT_IN = "--allow-pickle (config: allow_pickle: true) loads it, only if you trust whoever wrote the model"

# Types kd-ops itself puts in a skops file beyond skops' defaults (the all-class wrapper of every
# scikit-learn student); scikit-learn's own classes (tree node arrays, boosting predictors) are
# trusted by name in `_trusted_type`.
KD_OPS_TRUSTED_TYPES = frozenset(
    {
        "kd_ops.models.sklearn_students.SoftTargetClassifier",
        "kd_ops.sklearn_student.SoftTargetClassifier",  # the path models registered before kd-ops 0.2 name
    }
)

_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
_pickle_env_lock = threading.Lock()


@contextmanager
def mlflow_pickle_allowed() -> Iterator[None]:
    """MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true for one MLflow load the user consented to (or of a
    model this process has just written), then back to what it was. MLflow reads the variable at
    each load; the lock keeps two such loads (the serving watcher and the shadow thread) from
    restoring it under each other."""
    with _pickle_env_lock:
        before = os.environ.get(_PICKLE_ENV)
        os.environ[_PICKLE_ENV] = "true"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_PICKLE_ENV, None)
            else:
                os.environ[_PICKLE_ENV] = before


def _local_copy(uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def _flavors(local: Path) -> dict[str, Any]:
    """The MLmodel's flavours, read with yaml.safe_load (an MLmodel is data too)."""
    mlmodel = local / "MLmodel"
    if not mlmodel.exists():
        return {}
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    return flavors if isinstance(flavors, dict) else {}


def check_pt2_pickle_free(path: str | Path, uri: str) -> None:
    """`ConfigError` unless every record of the `pt2` archive at `path` is pickle-free.

    `torch.export.load` unpickles weights, constants and sample inputs with `weights_only=False`,
    so a record marked `use_pickle` runs code. The check is MLflow's own,
    `mlflow.pytorch._validate_pt2_archive_is_pickle_free` (MLflow 3.17): a private function, so
    this is the one place kd-ops calls it; if a later MLflow drops it, loading fails closed here.
    """
    try:
        from mlflow.pytorch import _validate_pt2_archive_is_pickle_free
    except ImportError:
        raise ConfigError(
            f"{uri}: this MLflow ({mlflow.__version__}) has no pt2 pickle check, so kd-ops cannot tell "
            f"whether loading the model runs code stored in it; {OPT_IN}"
        ) from None
    try:
        _validate_pt2_archive_is_pickle_free(str(path))
    except Exception as exc:  # noqa: BLE001 - MlflowException for a violation; anything else fails closed too
        record = re.search(r"record '([^']+)'", str(exc))
        what = f"record {record.group(1)!r}" if record else first_line(exc)
        raise ConfigError(
            f"{uri}: its pt2 archive holds pickled content ({what}), and loading it would run code "
            f"stored in the model file; {OPT_IN}"
        ) from None


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


def _trusted_type(name: str) -> bool:
    """kd-ops' own classes, and scikit-learn classes that resolve by name to a class defined in
    scikit-learn (not a function, not another package's class re-exported under sklearn.*)."""
    if name in KD_OPS_TRUSTED_TYPES:
        return True
    module, _, attr = name.rpartition(".")
    if not (module == "sklearn" or module.startswith("sklearn.")) or not attr.isidentifier():
        return False
    if {"tests", "conftest", "_testing", "experimental"} & set(module.split(".")):
        return False  # importing these runs test scaffolding or patches sklearn: not a model's classes
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - no such module or name: not trusted
        return False
    return isinstance(obj, type) and obj.__module__ == module and obj.__qualname__ == attr


def _inside(local: Path, relative: Any, uri: str) -> Path:
    """The model file the MLmodel names, which must lie inside the model's own directory."""
    if not isinstance(relative, str) or not relative:
        raise ConfigError(f"{uri}: its MLmodel names no scikit-learn model file")
    path = (local / relative).resolve()
    if not path.is_relative_to(local.resolve()) or not path.is_file():
        raise ConfigError(f"{uri}: its MLmodel names {relative!r}, which is not a file inside the model")
    return path


def _load_sklearn_local(local: Path, conf: dict[str, Any], uri: str, allow_pickle: bool) -> Any:
    import skops.io

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
    try:
        found = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - not a skops file
        raise ConfigError(f"{uri}: cannot read its skops file: {first_line(exc)}") from None
    refused = [t for t in found if not _trusted_type(t)]
    if refused and allow_pickle:
        # Consent to run code from the model: trust what its MLmodel lists, as MLflow would.
        listed = conf.get("skops_trusted_types") or []
        refused = [t for t in refused if t not in listed]
    if refused:
        raise ConfigError(
            f"{uri}: its skops file holds types kd-ops does not trust ({', '.join(refused)}), and "
            f"loading them could run code stored in the model file; {OPT_IN}"
            if not allow_pickle
            else f"{uri}: its skops file holds types neither kd-ops nor its MLmodel trusts: {', '.join(refused)}"
        )
    return skops.io.load(path, trusted=found)


def load_model(uri: str, allow_pickle: bool = False) -> Any:
    """A torch module or a scikit-learn estimator, whichever flavor the MLflow model has.

    Pickle-free unless `allow_pickle` (see the module docstring): a model whose loading would run
    code stored in it is a `ConfigError` naming the model and the opt-in."""
    local = _local_copy(uri)
    flavors = _flavors(local)
    if "sklearn" in flavors:
        return _load_sklearn_local(local, flavors["sklearn"], uri, allow_pickle)
    if "pytorch" in flavors or not flavors:
        return _load_torch_local(local, uri, module_tree=False, allow_pickle=allow_pickle)
    raise ConfigError(f"{uri}: its flavors are {sorted(flavors)}; kd-ops reads pytorch and sklearn models")


def _probe(model: Any, rows: np.ndarray) -> np.ndarray:
    if isinstance(model, nn.Module):
        with torch.inference_mode():
            return freeze(model)(torch.as_tensor(rows, dtype=torch.float32)).numpy()
    return np.asarray(model.predict_proba(rows))


def load_for_data(uri: str, dm: Any, key: str, torch_only: bool = False, allow_pickle: bool = False) -> Any:
    """Load `uri` and check it maps this dataset's rows to its classes; `key` names the setting in errors.

    `torch_only` is for teachers: a PyTorch model with its module tree, so layers can be tapped.
    `allow_pickle` is the user's consent to run code stored in the model file (a pickle model,
    a pt2 archive with pickled records, skops types kd-ops does not trust); without it such a
    model is a `ConfigError` naming `key`, the URI and the opt-in.
    """
    try:
        if torch_only:
            model = load_torch_model(uri, module_tree=True, allow_pickle=allow_pickle)
        else:
            model = load_model(uri, allow_pickle=allow_pickle)
    except ConfigError as exc:
        raise ConfigError(f"{key} = {exc}") from None
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
