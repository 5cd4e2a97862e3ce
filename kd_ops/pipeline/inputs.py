"""Users' own objects in a distillation: a DataFrame or a LightningDataModule as data, a network, an
estimator or a model URI as teacher, a network or an estimator as student.

Objects come in through the Python API (`run_distillation(cfg, teacher=..., student=..., data=...)`),
as Lightning's `Trainer.fit(model, datamodule=...)` takes them; a config never imports code. Each
is checked here, before any run exists, so a mismatch is one `ConfigError` at the start, not a
failure an hour into training; and each is described (class name or URI) for the run's params and
lineage.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.errors import ConfigError, first_line
from kd_ops.data.datamodule import DistillDataModule, ExtraRows, Splits, with_extra_rows
from kd_ops.data.datasets import RawDataset


def describe(obj: Any) -> str:
    """How params and lineage name an object: `object:module.Class` (a URI stays itself)."""
    if isinstance(obj, str):
        return obj
    cls = type(obj)
    return f"object:{cls.__module__}.{cls.__qualname__}"


def is_estimator(obj: Any) -> bool:
    return hasattr(obj, "predict_proba") and hasattr(obj, "fit") and not isinstance(obj, nn.Module)


# -- data ------------------------------------------------------------------------------------------


def _loader_arrays(loader: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ConfigError(f"data: {where} batch {i} is not (inputs, labels, ...): got {type(batch).__name__}")
        xs.append(torch.as_tensor(batch[0]).float().cpu())
        ys.append(torch.as_tensor(batch[1]).long().cpu())
    if not xs:
        raise ConfigError(f"data: {where} yields no batches")
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def from_lightning(cfg: ExperimentConfig, ldm: Any, extra: ExtraRows | None) -> DistillDataModule:
    """A user's LightningDataModule as kd-ops data: its train, val and test loaders are read once
    into arrays (inputs as float32, labels as class indices) and kept as the splits they are;
    the transfer set is the training rows. Inputs keep their shape (images stay images)."""
    ldm.prepare_data()
    ldm.setup("fit")
    parts = {"train": ldm.train_dataloader(), "val": ldm.val_dataloader()}
    ldm.setup("test")
    parts["test"] = ldm.test_dataloader()
    arrays = {k: _loader_arrays(v, f"{type(ldm).__name__}.{k}_dataloader()") for k, v in parts.items()}
    shapes = {k: a[0].shape[1:] for k, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"data: {type(ldm).__name__}'s loaders give inputs of different shapes: {shapes}")
    input_shape = tuple(int(d) for d in shapes["train"])
    x = np.concatenate([a[0].reshape(len(a[0]), -1) for a in arrays.values()]).astype(np.float32)
    y = np.concatenate([a[1] for a in arrays.values()]).astype(np.int64)
    if y.min() < 0:
        raise ConfigError(f"data: {type(ldm).__name__} gives negative labels; labels are class indices 0..C-1")
    n = {k: len(a[1]) for k, a in arrays.items()}
    train = np.arange(n["train"])
    val = np.arange(n["train"], n["train"] + n["val"])
    test = np.arange(n["train"] + n["val"], len(y))
    raw = RawDataset(type(ldm).__name__, x, y, input_shape, int(y.max()) + 1, float(np.abs(x).max() or 1.0))
    from kd_ops.data.slicing import InputSlices

    splits = Splits(train, val, test, train.copy(), InputSlices.fit(x[train]))
    if extra is not None and len(extra.y):
        raw, splits = with_extra_rows(raw, splits, extra)
    dm = DistillDataModule(cfg.data, cfg.seed, extra=extra)
    dm.raw, dm.splits = raw, splits
    return dm


def data_module(cfg: ExperimentConfig, data: Any, extra: ExtraRows | None) -> DistillDataModule:
    """The run's data: the config's, a DataFrame read with the config's `data.*` keys, or a
    LightningDataModule's loaders."""
    import lightning as L
    import pandas as pd

    if data is None:
        dm = DistillDataModule(cfg.data, cfg.seed, extra=extra)
    elif isinstance(data, pd.DataFrame):
        if not cfg.data.label:
            raise ConfigError("data: a DataFrame needs data.label in the config: the column to predict")
        dm = DistillDataModule(cfg.data, cfg.seed, extra=extra, frame=data)
    elif isinstance(data, DistillDataModule):
        dm = data
    elif isinstance(data, L.LightningDataModule):
        dm = from_lightning(cfg, data, extra)
    else:
        raise ConfigError(f"data: expected a pandas DataFrame or a LightningDataModule, got {type(data).__name__}")
    dm.setup()
    return dm


def table_defaults(cfg: ExperimentConfig, dm: DistillDataModule) -> ExperimentConfig:
    """The table defaults of `kd_ops.catalog.with_table_defaults` (a DataFrame through the Python
    API is known to be a table only now), and what a table cannot take."""
    from kd_ops.catalog import with_table_defaults
    from kd_ops.distill.recipes import with_recipe

    if dm.schema is None:
        return with_recipe(cfg, False)
    cfg = with_recipe(with_table_defaults(cfg, True), True)
    if cfg.evaluation.robustness:
        raise ConfigError("evaluation.robustness: its corruptions (noise, shift, contrast) are for images, not tables")
    for key in ("mixup", "cutmix", "jitter"):
        if getattr(cfg.distill, key):
            raise ConfigError(
                f"distill.{key}: blends, boxes and noise of encoded table rows (category indices) are not tables; "
                "set it to 0 for tabular data (distill.swap_noise is the augmentation a table takes)"
            )
    if dm.schema.has_text and cfg.distill.swap_noise:
        raise ConfigError(
            "distill.swap_noise: swapping values between rows would swap single tokens of texts; "
            "a table with a text column (data.text) takes no swap noise: set it to 0"
        )
    return cfg


# -- teachers and students ---------------------------------------------------------------------------


def teacher_object(obj: Any, dm: DistillDataModule, allow_pickle: bool) -> nn.Module:
    """A teacher given as an object or URI, as the frozen module over the run's rows kd-ops uses."""
    from kd_ops.models.estimators import EstimatorTeacher
    from kd_ops.models.loading import _probe, load_for_data

    if isinstance(obj, str):
        return load_for_data(obj, dm, "teacher", torch_only=True, allow_pickle=allow_pickle)
    if isinstance(obj, nn.Module):
        model = obj
    elif hasattr(obj, "predict_proba"):
        table = dm.schema
        classes = table.classes if table is not None else None
        model = EstimatorTeacher(obj, classes, table, takes_frame=table is not None, where="teacher")
    else:
        raise ConfigError(
            f"teacher: expected a torch module, a LightningModule, an estimator with predict_proba or a model URI, "
            f"got {type(obj).__name__}"
        )
    try:
        out = _probe(model, dm.arrays("val")[0][:2])
    except Exception as exc:  # noqa: BLE001 - whatever the user's model raises
        raise ConfigError(f"teacher {describe(obj)}: fails on two rows of the data: {first_line(exc)}") from None
    if out.ndim != 2 or out.shape[1] != dm.n_classes:
        raise ConfigError(
            f"teacher {describe(obj)}: outputs shape {tuple(out.shape)}, expected (batch, {dm.n_classes})"
        )
    return model


def student_object(obj: Any, dm: DistillDataModule, seed: int = 0) -> Any:
    """A student given as an object: a network (checked to run and to export) or an estimator.

    On a table the network is put behind kd-ops' table input layer (`TableInput`: per-column
    scaling, missing values, category embeddings), so it receives dense features; its first layer
    can be `nn.LazyLinear`, which sizes itself on the first batch. The registered model is then
    the whole (input layer + network), taking raw records like any table student."""
    if is_estimator(obj):
        return obj
    if not isinstance(obj, nn.Module):
        raise ConfigError(f"student: expected a torch module or a scikit-learn estimator, got {type(obj).__name__}")
    example = torch.as_tensor(dm.arrays("val")[0][:4])
    if dm.schema is not None:
        from collections import OrderedDict

        from kd_ops.models.tabular import TableInput

        torch.manual_seed(seed)
        obj = nn.Sequential(OrderedDict(normalize=TableInput(dm.schema), net=obj))
        try:
            with torch.no_grad():
                obj(example)  # sizes lazy layers before anything copies or exports the module
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"student {describe(obj[1])}: fails on the table's dense features "
                f"({obj[0].width} per row): {first_line(exc)}"
            ) from None
    model = copy.deepcopy(obj).eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            f"student {describe(obj)}: fails on rows of the data ({tuple(example.shape)}): {first_line(exc)}"
        ) from None
    if out.ndim != 2 or out.shape[1] != dm.n_classes:
        raise ConfigError(
            f"student {describe(obj)}: outputs shape {tuple(out.shape)}, expected (batch, {dm.n_classes})"
        )
    try:
        torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        raise ConfigError(
            f"student {describe(obj)}: torch.export cannot export it, so it could not be registered or served "
            f"({type(exc).__name__}: {first_line(exc)}); see https://pytorch.org/docs/stable/export.html"
        ) from None
    return obj
