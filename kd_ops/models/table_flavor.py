"""kd-ops' MLflow model format for tables: data files read by kd-ops' own code, never a pickle.

A registered table model is an MLflow pyfunc model whose `loader_module` is this module (not a
cloudpickled `PythonModel`): its data folder holds

- `schema.json`: the columns, their kinds and training statistics, the user's classes;
- `meta.json`: which model format follows, and the kd-ops version that wrote it;
- the model over encoded rows in a format that runs no code when read: `network.pt2` (a
  `torch.export` program, checked for pickled records before loading), `estimator.skops`
  (loaded with kd-ops' trusted types), `booster.txt` (LightGBM's text model),
  `booster.json` (XGBoost's JSON model), or `encoder.json` plus `head.skops` (a pretrained
  text encoder by folder and weights digest, and its head: `kd_ops.models.pretrained_text`).

So `mlflow.pyfunc.load_model(uri).predict(records)` works anywhere kd-ops is installed (it returns
the user's class labels), `.get_raw_model()` is the `TableModel` with `predict_proba`, and the
signature lists the original columns with their types.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kd_ops.core.errors import ConfigError
from kd_ops.data.tables import TableSchema
from kd_ops.models.table_model import TableModel

LOADER_MODULE = __name__
FORMATS = ("pt2", "skops", "lightgbm", "xgboost", "pretrained_text")
_FILES = {
    "pt2": "network.pt2",
    "skops": "estimator.skops",
    "lightgbm": "booster.txt",
    "xgboost": "booster.json",
    "pretrained_text": "encoder.json",  # where the encoder is, its weights' SHA-256; the head in head.skops
}


def inner_format(model: Any) -> str:
    from torch import nn

    from kd_ops.models.estimators import EstimatorTeacher

    if isinstance(model, EstimatorTeacher):
        model = model.estimator
    if isinstance(model, nn.Module):
        return "pt2"
    if type(model).__name__ == "PretrainedTextClassifier":
        return "pretrained_text"
    module = type(model).__module__
    if module.startswith("lightgbm"):
        return "lightgbm"
    if module.startswith("xgboost"):
        return "xgboost"
    return "skops"


def _save_inner(model: Any, fmt: str, folder: Path, example: np.ndarray) -> None:
    from kd_ops.models.estimators import EstimatorTeacher

    if isinstance(model, EstimatorTeacher):
        model = model.estimator
    path = folder / _FILES[fmt]
    if fmt == "pt2":
        import torch

        ex = torch.as_tensor(np.asarray(example[:5], dtype=np.float32))
        program = torch.export.export(model, (ex,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        torch.export.save(program, str(path))
    elif fmt == "pretrained_text":
        model.save(folder)
    elif fmt == "lightgbm":
        booster = model.booster_ if hasattr(model, "booster_") else model
        booster.save_model(str(path))
    elif fmt == "xgboost":
        booster = model.get_booster() if hasattr(model, "get_booster") else model
        booster.save_model(str(path))
    else:
        import skops.io

        skops.io.dump(model, path)


def write_model_folder(model: Any, schema: TableSchema, folder: Path, example: np.ndarray) -> Path:
    """The data folder of a table model: schema, meta and the encoded-rows model."""
    from kd_ops.core.version import __version__

    folder.mkdir(parents=True, exist_ok=True)
    fmt = inner_format(model)
    _save_inner(model, fmt, folder, example)
    (folder / "schema.json").write_text(json.dumps(schema.to_dict(), indent=1))
    (folder / "meta.json").write_text(json.dumps({"format": fmt, "file": _FILES[fmt], "kd_ops": __version__}))
    return folder


def read_model_folder(
    folder: str | Path, uri: str = "", allow_pickle: bool = False, module_tree: bool = False
) -> TableModel:
    """A table model back from its data folder, with no unpickling (see the module docstring).
    `module_tree`: a network keeps its module tree (`torch.export.unflatten`: slower, but its
    layers can be hooked, as `kd_ops.models.embedding` does)."""
    folder = Path(folder)
    where = uri or str(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        schema = TableSchema.from_dict(json.loads((folder / "schema.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: not a readable kd-ops table model ({exc})") from None
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: unknown kd-ops table model format {fmt!r}")
    path = folder / _FILES[fmt]
    if not path.is_file():
        raise ConfigError(f"{where}: the table model's {_FILES[fmt]} is missing")
    if fmt == "pt2":
        import torch

        from kd_ops.models.safe_load import check_pt2_pickle_free
        from kd_ops.models.zoo import freeze

        if not allow_pickle:
            check_pt2_pickle_free(path, where)
        program = torch.export.load(str(path))
        inner = freeze(torch.export.unflatten(program) if module_tree else program.module())
    elif fmt == "pretrained_text":
        from kd_ops.models.pretrained_text import PretrainedTextClassifier

        inner = PretrainedTextClassifier.load(folder, schema, where, allow_pickle)
    elif fmt == "lightgbm":
        import lightgbm as lgb

        inner = lgb.Booster(model_file=str(path))
    elif fmt == "xgboost":
        import xgboost as xgb

        inner = xgb.Booster()
        inner.load_model(str(path))
    else:
        from kd_ops.models.safe_load import load_skops_file

        inner = load_skops_file(path, where, allow_pickle)
    return TableModel(schema, inner, fmt)


def signature(schema: TableSchema) -> Any:
    """Inputs: the original columns with their types; output: the class label."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    kinds = {"numeric": "double", "boolean": "boolean", "categorical": "string", "text": "string"}
    inputs = Schema(
        [ColSpec("long" if c.integer else kinds[c.kind], c.name, required=False) for c in schema.columns]
    )
    first = schema.classes[0]
    label_type = "boolean" if isinstance(first, bool) else "long" if isinstance(first, int) else "string"
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(label_type, schema.label)]))


def example_frame(schema: TableSchema, x: np.ndarray):
    """Encoded rows decoded back to records, in the types the signature names."""
    frame = schema.decode(x[:5])
    for c in schema.columns:
        if c.integer and not frame[c.name].isna().any():
            frame[c.name] = frame[c.name].astype("int64")
        elif c.kind == "categorical":
            frame[c.name] = frame[c.name].astype(object).where(frame[c.name].notna(), None)
        elif c.kind == "boolean":
            frame[c.name] = frame[c.name].astype(object)
    return frame


def log_table_model(
    model: Any, schema: TableSchema, example: np.ndarray, registered_name: str | None = None, name: str = "model"
):
    """Log a model over encoded rows as a kd-ops table model into the active run."""
    import mlflow.pyfunc

    from kd_ops.core.version import __version__

    with tempfile.TemporaryDirectory(prefix="kd-ops-table-") as tmp:
        folder = write_model_folder(model, schema, Path(tmp) / "table", example)
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=LOADER_MODULE,
            data_path=str(folder),
            signature=signature(schema),
            input_example=example_frame(schema, example),
            pip_requirements=[f"kd-ops=={__version__}"],
            registered_model_name=registered_name,
        )


class _PyfuncTable:
    """What `mlflow.pyfunc.load_model` wraps: `predict` gives labels, `get_raw_model` the TableModel."""

    def __init__(self, model: TableModel):
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.model.predict(model_input)

    def get_raw_model(self) -> TableModel:
        return self.model


def _load_pyfunc(data_path: str) -> _PyfuncTable:
    """MLflow's entry point (`loader_module`): the data folder MLflow downloaded."""
    return _PyfuncTable(read_model_folder(data_path))


def is_table_model(local: Path) -> Path | None:
    """The data folder of the MLflow model at `local` if it is a kd-ops table model."""
    import yaml

    mlmodel = local / "MLmodel"
    if not mlmodel.exists():
        return None
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(pyfunc, dict) or pyfunc.get("loader_module") != LOADER_MODULE:
        return None
    data = pyfunc.get("data")
    path = (local / str(data)).resolve() if data else None
    if path is None or not path.is_relative_to(local.resolve()) or not path.is_dir():
        raise ConfigError(f"{local}: a kd-ops table model whose data folder {data!r} is missing")
    return path
