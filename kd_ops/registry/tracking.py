"""MLflow: where runs go, how models are logged, and the lineage a registered student carries."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from kd_ops.core.version import __version__

# Tags on runs and model versions. Dotted and namespaced so they never collide with MLflow's own.
TAG_ROLE = "kd_ops.role"
TAG_TEACHER_URI = "kd_ops.teacher_model_uri"
TAG_DATASET = "kd_ops.dataset_fingerprint"
TAG_CONFIG_HASH = "kd_ops.config_hash"
TAG_CODE_VERSION = "kd_ops.code_version"


def sqlite_path(uri: str) -> Path | None:
    """The database file behind a `sqlite:///` URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urlparse(uri).path if uri.startswith("sqlite:////") else uri.removeprefix("sqlite:///"))


def _store_error(uri: str, key: str, exc: BaseException) -> Exception:
    """A store that cannot be used as given, in one line naming `key`; connection trouble (a server
    briefly away) passes through unchanged so the flows' retries still see it."""
    import requests

    from kd_ops.core.errors import ConfigError, first_line

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return exc
    text = str(exc)
    if "filesystem tracking backend" in text:
        why = "a plain file store, which MLflow 3 refuses; use a database (sqlite:///mlflow.db) or a server"
    elif "unsupported URI" in text:
        why = "not a URI scheme MLflow can track to (sqlite:///FILE, postgresql://..., http://HOST:PORT, ...)"
    elif isinstance(exc, OSError):
        why = f"cannot create or open it: {exc.strerror or first_line(exc)}"
        if exc.filename:
            why += f" ({exc.filename})"
    else:
        why = first_line(exc)
        if type(exc).__name__ not in why and not why.startswith(("Max retries", "API request")):
            why = f"cannot open it: {why}"
    return ConfigError(f"{key} = {uri!r}: {why}")


_OPENED: set[str] = set()  # URIs whose stores this process has already opened


def open_tracking(uri: str, key: str = "tracking.uri") -> MlflowClient:
    """Point this process's MLflow at `uri` and check that its tracking and registry stores open.

    Every command calls this first, so every later MLflow call (runs, the registry, downloads of
    `models:/` URIs) goes to the store the user named, never a `./mlflow.db` in the working
    directory; and a URI that cannot work (`foo://x`, a file store, a directory that cannot be
    written) is one `ConfigError` naming `key` before anything runs. Connection failures pass
    through unchanged (a server restarting is worth a retry, not a config error)."""
    mlflow.set_tracking_uri(uri)
    if uri in _OPENED:  # checked once per process: a distillation opens its store at several steps
        return MlflowClient(uri)
    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # opens (and on SQLite, creates) the tracking store
        client.search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and the OS raise many types
        raise _store_error(uri, key, exc) from None
    _OPENED.add(uri)
    return client


def use_experiment(uri: str, name: str) -> str:
    """Point MLflow at `uri` and return the id of experiment `name`, creating it if needed.

    With a SQLite store the artifacts go beside the database file (`mlartifacts/`), not into
    whatever directory the command happened to start in.
    """
    client = open_tracking(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        location = (db.resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


@functools.cache
def code_version() -> str:
    """kd-ops version, plus the git commit when running from a checkout."""
    version = __version__
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def log_torch_model(
    model: Any, example: np.ndarray, registered_name: str | None = None
) -> "mlflow.models.model.ModelInfo":
    """Log `model` to the active run as `model`, with signature and input example.

    Saved with torch.export (MLflow's `pt2` format): weights are raw tensor records, so the
    archive passes the pickle-free check kd-ops runs before loading, and needs no kd-ops code.
    Requirements are pinned here so MLflow does not spend seconds inferring them.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    example = np.asarray(example[:5], dtype=np.float32)
    with torch.inference_mode():
        out = model(torch.from_numpy(example)).numpy()
    torch_version = torch.__version__.split("+")[0]
    return mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example,
        signature=infer_signature(example, out),
        pip_requirements=[f"torch=={torch_version}"],
        registered_model_name=registered_name,
        serialization_format="pt2",
    )


def log_sklearn_model(
    model: Any, example: np.ndarray, registered_name: str | None = None
) -> "mlflow.models.model.ModelInfo":
    """Log a scikit-learn student with MLflow's sklearn flavor (skops format: kd-ops loads it with
    its own trusted types, no pickle)."""
    import mlflow.sklearn
    import sklearn
    import skops.io
    from mlflow.models import infer_signature

    example = np.asarray(example[:5], dtype=np.float32)
    # skops refuses types beyond its defaults (tree node arrays, our all-class wrapper) unless
    # listed; this model was built by this process, so its own types are the ones to trust.
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model)) or None
    from kd_ops.models.loading import mlflow_pickle_allowed

    # log_model loads what it has just written to check the input example; MLflow gates every
    # sklearn load (skops included) on MLFLOW_ALLOW_PICKLE_DESERIALIZATION, false in kd-ops.
    with mlflow_pickle_allowed():
        return mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=example,
            signature=infer_signature(example, model.predict_proba(example)),
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            registered_model_name=registered_name,
            pyfunc_predict_fn="predict_proba",
            skops_trusted_types=trusted,
        )


def register_with_alias(name: str, version: str | int, alias: str, tags: dict[str, str], description: str = "") -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if description:
        client.update_model_version(name, str(version), description=description)
    client.set_registered_model_alias(name, alias, str(version))


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
