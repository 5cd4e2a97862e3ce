"""Reading model files without running code stored in them: the checks every loader shares.

Kept apart from `kd_ops.models.loading` (which resolves MLflow URIs) so that kd-ops' own table
format (`kd_ops.models.table_flavor`) reads its files with the same checks."""

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

from kd_ops.core.errors import ConfigError, first_line

OPT_IN = "--allow-pickle (config: allow_pickle: true) loads it, only if you trust whoever wrote the model"

# Types kd-ops itself puts in a skops file beyond skops' defaults (the all-class wrapper of every
# scikit-learn student); scikit-learn's own classes (tree node arrays, boosting predictors) are
# trusted by name in `_trusted_type`.
KD_OPS_TRUSTED_TYPES = frozenset(
    {
        "kd_ops.models.sklearn_students.SoftTargetClassifier",
        "kd_ops.models.sklearn_students.TokenTfidf",  # TF-IDF of a text column's token ids
        "kd_ops.sklearn_student.SoftTargetClassifier",  # the path models registered before kd-ops 0.2 name
        # scikit-learn's imputers keep the dtype they were fitted on; skops rebuilds a numpy dtype
        # from its name (np.dtype("float64")), which creates a data type and runs nothing else.
        "numpy.dtype",
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


def load_skops_file(path: Path, uri: str, allow_pickle: bool, listed: list[str] | tuple[str, ...] = ()) -> Any:
    """A skops file, loaded with kd-ops' trusted types; with `allow_pickle`, also the types `listed`
    (what the model's own MLmodel trusts, as MLflow would)."""
    import skops.io

    try:
        found = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - not a skops file
        raise ConfigError(f"{uri}: cannot read its skops file: {first_line(exc)}") from None
    refused = [t for t in found if not _trusted_type(t)]
    if refused and allow_pickle:
        # Consent to run code from the model: trust what its MLmodel lists, as MLflow would.
        refused = [t for t in refused if t not in listed]
    if refused:
        raise ConfigError(
            f"{uri}: its skops file holds types kd-ops does not trust ({', '.join(refused)}), and "
            f"loading them could run code stored in the model file; {OPT_IN}"
            if not allow_pickle
            else f"{uri}: its skops file holds types neither kd-ops nor its MLmodel trusts: {', '.join(refused)}"
        )
    return skops.io.load(path, trusted=found)
