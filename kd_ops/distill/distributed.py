"""Teacher outputs computed by several processes (Lightning's `Trainer.predict` under DDP), then
merged and written once by the main process into the teacher-output cache.

Each rank predicts its shard of the rows and saves it, with the rows' indices, to a file of its
own (a `BasePredictionWriter`); the main process puts every row back in its place. The
distributed sampler pads the last shard by repeating rows, so a row can arrive twice, with the
same values; a row that never arrives is an error, not a zero.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kd_ops.distill.cache import FEATURE_PREFIX, LOGITS

INDEX = "index"


def world_size(train: Any) -> int:
    """Processes a `train` section asks for: devices × nodes (1 when devices is 'auto' or a list)."""
    devices = train.devices if isinstance(train.devices, int) else 1
    return max(1, devices) * max(1, train.num_nodes)


class _TeacherInference(L.LightningModule):
    def __init__(self, teacher: nn.Module, paths: list[str]):
        super().__init__()
        self.teacher, self.paths = teacher, list(paths)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        from kd_ops.distill.taps import tapped

        x, index = batch
        if self.paths:
            with tapped(self.teacher, self.paths, "teacher") as tap:
                out = {LOGITS: self.teacher(x)}
                out.update({FEATURE_PREFIX + p: t for p, t in tap.features.items()})
        else:
            out = {LOGITS: self.teacher(x)}
        return {INDEX: index.cpu(), **{k: v.to("cpu", torch.float32) for k, v in out.items()}}


class _RankWriter(BasePredictionWriter):
    def __init__(self, directory: str):
        super().__init__(write_interval="epoch")
        self.directory = directory

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        merged = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        torch.save(merged, Path(self.directory) / f"rank-{trainer.global_rank}.pt")


def distributed_teacher_outputs(
    teacher: nn.Module, x: Tensor, train: Any, paths: list[str] | tuple[str, ...] = (), batch_size: int = 1024
) -> dict[str, Tensor]:
    """Teacher logits (and tapped features) for every row of `x`, in row order, computed by the
    processes `train` asks for (its accelerator, devices, strategy and num_nodes)."""
    with tempfile.TemporaryDirectory(prefix="kd-ops-teacher-") as tmp:
        trainer = L.Trainer(
            accelerator=train.accelerator,
            devices=train.devices,
            strategy=train.strategy,
            num_nodes=train.num_nodes,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[_RankWriter(tmp)],
        )
        loader = DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=batch_size)
        trainer.predict(_TeacherInference(teacher, list(paths)), dataloaders=loader, return_predictions=False)
        parts = [torch.load(f, weights_only=True) for f in sorted(Path(tmp).glob("rank-*.pt"))]
    if not parts:
        raise RuntimeError("distributed teacher inference wrote no outputs")
    index = torch.cat([p[INDEX] for p in parts]).long()
    seen = torch.zeros(len(x), dtype=torch.bool)
    seen[index] = True
    if not bool(seen.all()):
        raise RuntimeError(f"distributed teacher inference missed {int((~seen).sum())} of {len(x)} rows")
    out: dict[str, Tensor] = {}
    for name in parts[0]:
        if name == INDEX:
            continue
        values = torch.cat([p[name] for p in parts])
        full = torch.empty((len(x), *values.shape[1:]), dtype=values.dtype)
        full[index] = values  # padded duplicates write the same values twice
        out[name] = full
    return out
