"""One registered model version, ready to answer requests, and the teacher that shadows it.

A served version is immutable: the server swaps the whole object when the alias moves, so a
request that picked up version 3 finishes on version 3 and is logged as version 3.

Two kinds of version are served. A model of rows (images, plain features) takes float32 rows of
its width and answers class indices. A kd-ops table model (`TableModel`) carries its
`TableSchema`: clients send records keyed by the original columns, the server encodes them
(`schema.encode`) and scores the encoded rows (`encoded_proba`), and answers the user's labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kd_ops.core.errors import ConfigError, first_line
from kd_ops.data.slicing import SLICES_ARTIFACT, Slicer, slicer_from_dict
from kd_ops.data.tables import TableSchema
from kd_ops.prediction_log.store import utcnow
from kd_ops.registry.tracking import TAG_TEACHER_URI

log = logging.getLogger(__name__)

Proba = Callable[[np.ndarray], np.ndarray]


def probability_fn(model: Any) -> Proba:
    """float32 rows -> float32 class probabilities, for a torch network, a scikit-learn estimator,
    or a kd-ops table model (over its encoded rows: the server encodes each request once)."""
    from kd_ops.models.table_model import TableModel

    if isinstance(model, TableModel):
        return lambda x: np.ascontiguousarray(model.encoded_proba(x), dtype=np.float32)
    if isinstance(model, nn.Module):

        def torch_proba(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()

        return torch_proba
    return lambda x: np.ascontiguousarray(model.predict_proba(x), dtype=np.float32)


def load_probability_fn(uri: str, allow_pickle: bool = False) -> Proba:
    """The probabilities of the model at `uri` (any URI MLflow resolves; pytorch or sklearn flavour).

    Pickle-free unless `allow_pickle` (`kd-ops serve --allow-pickle`): a model whose loading would
    run code stored in its file is a `ConfigError`, so a crafted version never runs in the server."""
    from kd_ops.models.loading import load_model

    return probability_fn(load_model(uri, allow_pickle=allow_pickle))


def table_schema(model: Any) -> TableSchema | None:
    """The schema of a kd-ops table model; None for a model of rows."""
    from kd_ops.models.table_model import TableModel

    return model.schema if isinstance(model, TableModel) else None


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str
    run_id: str | None
    source: str | None
    lineage: dict[str, str]
    n_features: int
    n_classes: int
    predict_proba: Proba = field(repr=False)
    slicer: Slicer | None = None
    # A table model's columns and classes: requests send records, answers carry the user's labels.
    schema: TableSchema | None = field(default=None, repr=False)
    loaded_at: str = field(default_factory=lambda: utcnow().isoformat(timespec="seconds") + "Z")

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def teacher_uri(self) -> str | None:
        return self.lineage.get(TAG_TEACHER_URI)

    @property
    def classes(self) -> list[Any]:
        """What each column of the probabilities stands for: a table's labels, else 0..n-1."""
        return list(self.schema.classes) if self.schema is not None else list(range(self.n_classes))

    def labels(self, index: np.ndarray) -> list[Any]:
        """Class indices as the answer names them (the user's labels for a table model)."""
        index = np.asarray(index).tolist()
        if self.schema is None:
            return index
        classes = self.schema.classes
        return [classes[i] for i in index]

    def describe(self) -> dict[str, Any]:
        columns = None if self.schema is None else [{"name": c.name, "kind": c.kind} for c in self.schema.columns]
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "uri": self.uri,
            "run_id": self.run_id,
            "source": self.source,
            "input": "rows" if self.schema is None else "records",
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "classes": self.classes,
            "columns": columns,
            "slices": list(self.slicer.names) if self.slicer else [],
            "loaded_at": self.loaded_at,
            "lineage": self.lineage,
        }


def resolve_alias(client: Any, name: str, alias: str) -> str:
    """The version `alias` points at; `ConfigError` naming both if the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError(f"registered model {name!r} has no version with alias @{alias}") from None
        raise


def _feature_count(uri: str) -> int | None:
    import mlflow

    signature = mlflow.models.get_model_info(uri).signature
    if signature is None or signature.inputs is None:
        return None
    inputs = signature.inputs.inputs
    if len(inputs) == 1 and getattr(inputs[0], "shape", None):  # one tensor (batch, features)
        return int(inputs[0].shape[-1])
    return len(inputs)  # one column per feature


def _slicer(client: Any, run_id: str | None) -> Slicer | None:
    if not run_id:
        return None
    try:
        import json

        path = client.download_artifacts(run_id, SLICES_ARTIFACT)
        with open(path) as fh:
            return slicer_from_dict(json.load(fh))
    except Exception as exc:  # noqa: BLE001 - students from before kd-ops 0.1 carry none: serve without
        log.warning("no %s in run %s (%s): predictions are logged without derived slices", SLICES_ARTIFACT, run_id, exc)
        return None


def load_version(client: Any, name: str, version: str, alias: str, allow_pickle: bool = False) -> ServedModel:
    """Load version `version` of `name`, probe it with one row, and read what the server needs.

    `allow_pickle`: consent to load a version whose file runs code when loaded (see kd_ops.models.loading)."""
    from kd_ops.models.loading import load_model

    uri = f"models:/{name}/{version}"
    try:
        mv = client.get_model_version(name, version)
        model = load_model(uri, allow_pickle=allow_pickle)
        schema = table_schema(model)
        # A table model's width is its schema's; a model of rows names its width in the signature.
        n_features = len(schema.columns) if schema is not None else _feature_count(uri)
        predict_proba = probability_fn(model)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow, torch and skops raise many types
        raise ConfigError(f"{uri}: cannot load it for serving: {first_line(exc)}") from None
    if n_features is None:
        raise ConfigError(f"{uri}: the model has no input signature, so the feature count is unknown")
    # A table's probe is a record with every value missing: valid for every column kind (NaN is
    # how the encoding says "missing"), where zeros could name a category index out of range.
    probe = (
        np.full((1, schema.width), np.nan, dtype=np.float32)
        if schema is not None
        else np.zeros((1, n_features), dtype=np.float32)
    )
    try:
        out = predict_proba(probe)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{uri}: the model fails on a row of {n_features} features: {first_line(exc)}") from None
    if out.ndim != 2 or out.shape[0] != 1:
        raise ConfigError(f"{uri}: the model outputs shape {tuple(out.shape)} for one row, expected (1, classes)")
    if schema is not None and out.shape[1] != len(schema.classes):
        raise ConfigError(
            f"{uri}: the model outputs {out.shape[1]} probabilities, but its schema names {len(schema.classes)}"
            f" classes {list(schema.classes)[:20]}"
        )
    return ServedModel(
        name=name,
        version=str(mv.version),
        alias=alias,
        run_id=mv.run_id,
        source=mv.source,
        lineage={k: v for k, v in sorted(mv.tags.items()) if k.startswith("kd_ops.")},
        n_features=n_features,
        n_classes=int(out.shape[1]),
        predict_proba=predict_proba,
        slicer=_slicer(client, mv.run_id),
        schema=schema,
    )
