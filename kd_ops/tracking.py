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

import kd_ops

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


def use_experiment(uri: str, name: str) -> str:
    """Point MLflow at `uri` and return the id of experiment `name`, creating it if needed.

    With a SQLite store the artifacts go beside the database file (`mlartifacts/`), not into
    whatever directory the command happened to start in.
    """
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
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
    version = kd_ops.__version__
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(kd_ops.__file__).parent,
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

    Saved with torch.export (MLflow's `pt2` format): loading needs no pickle and no kd-ops
    code. Requirements are pinned here so MLflow does not spend seconds inferring them.
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
    """Log a scikit-learn student with MLflow's sklearn flavor (skops format: no pickle on load)."""
    import mlflow.sklearn
    import sklearn
    import skops.io
    from mlflow.models import infer_signature

    example = np.asarray(example[:5], dtype=np.float32)
    # skops refuses types beyond its defaults (tree node arrays, our all-class wrapper) unless
    # listed; this model was built by this process, so its own types are the ones to trust.
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model)) or None
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
