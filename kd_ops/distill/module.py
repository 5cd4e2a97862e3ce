"""The distiller: a LightningModule around a frozen teacher and a trainable student.

The contract follows mdistiller: `forward_train(x, y, index) -> (logits, {loss_name: weighted_loss})`,
which maps straight onto `training_step`. With no teacher and no loss terms it is plain
supervised training, which is how the teacher and the labels-only baseline are trained: one
code path for all three. `export()` hands back the plain student; nothing of the wrapper
(teacher, connectors, memory banks, optimiser state) reaches the registry.

Teacher outputs come either from the teacher itself (inputs that change every step: mixup,
jitter) or from a precomputed table (`teacher_outputs`, see `kd_ops.distill.cache`) indexed by row, so
a large teacher runs once instead of once per epoch.
"""

from __future__ import annotations

import copy
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_ops.distill.losses import DistillLoss, Step, taps_of
from kd_ops.distill.taps import FeatureTap, probe_shapes
from kd_ops.models.zoo import freeze


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: list[DistillLoss] | None = None,
        ce_weight: float = 1.0,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        jitter: float = 0.0,
        mixup: float = 0.0,
        rows: np.ndarray | None = None,
        teacher_outputs: dict[str, torch.Tensor] | None = None,
        corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`rows`: dataset row indices of the training rows, in the order of `teacher_outputs`.
        `corrupt`: a batch -> batch augmentation of raw rows (a robust teacher, see `kd_ops.data.corrupt_some`)."""
        super().__init__()
        self.student = student
        self.losses = nn.ModuleList(terms or [])  # trainable connectors and heads go to the optimiser
        if any(t.needs_teacher for t in self.losses) and teacher is None and teacher_outputs is None:
            raise ValueError("these loss terms need a teacher: " + ", ".join(type(t).__name__ for t in self.losses))
        # Not a registered submodule: Lightning's train()/eval() toggles, the optimiser, device
        # strategies and checkpoints never see the teacher. It is frozen here and moved by hand.
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            freeze(teacher)
        self.ce_weight, self.lr, self.weight_decay = ce_weight, lr, weight_decay
        self.jitter, self.mixup, self.corrupt = jitter, mixup, corrupt
        self.teacher_outputs = teacher_outputs
        self.student_paths = taps_of(list(self.losses), "student")
        self.teacher_paths = taps_of(list(self.losses), "teacher")
        self._student_tap = FeatureTap(student, self.student_paths, "student") if self.student_paths else None
        live_teacher_taps = self.teacher_paths and teacher_outputs is None
        self._teacher_tap = FeatureTap(teacher, self.teacher_paths, "teacher") if live_teacher_taps else None
        self._position: torch.Tensor | None = None
        if rows is not None:
            position = torch.full((int(np.max(rows)) + 1,), -1, dtype=torch.long)
            position[torch.as_tensor(rows, dtype=torch.long)] = torch.arange(len(rows))
            self._position = position
        self.n_rows = len(rows) if rows is not None else 0
        self._classes: int | None = None
        self.save_hyperparameters(ignore=["student", "teacher", "terms", "rows", "teacher_outputs", "corrupt"])

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self, example: torch.Tensor) -> None:
        """Size the terms' connectors from one probe batch; fail early on bad paths or shapes."""
        if not len(self.losses):
            return
        mode = self.student.training
        self.student.eval()
        try:
            student_shapes = probe_shapes(self.student, self.student_paths, example, "student")
            with torch.no_grad():
                self._classes = int(self.student(example[:2]).shape[1])
        finally:
            self.student.train(mode)
        if self.teacher_outputs is not None:
            teacher_shapes = {p: tuple(self.teacher_outputs[f"feat:{p}"].shape[1:]) for p in self.teacher_paths}
        else:
            teacher_shapes = probe_shapes(self.teacher, self.teacher_paths, example, "teacher")
        student_shapes["logits"] = teacher_shapes["logits"] = (self._classes,)
        for term in self.losses:
            term.prepare(student_shapes, teacher_shapes, self.n_rows)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    # -- training --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def _local(self, index: torch.Tensor) -> torch.Tensor:
        """Dataset row indices -> positions in the training rows (what caches and memory banks use)."""
        if self._position is None:
            return index
        local = self._position.to(index.device)[index]
        if (local < 0).any():
            raise IndexError("a batch holds rows outside the training rows this module was built for")
        return local

    def _augment(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Jitter and mixup of the training rows: new inputs for the teacher to label.

        Jitter adds Gaussian noise in standardized units. Mixup blends pairs of rows; the hard
        target becomes the same blend of one-hot labels, while a teacher labels the blended
        input itself, which is where distillation gains most on a small transfer set.
        """
        if self.corrupt is not None:
            x = self.corrupt(x)
        if self.jitter:
            std = self.student.normalize.std if hasattr(self.student, "normalize") else 1.0
            x = x + torch.randn_like(x) * self.jitter * std
        if self.mixup:
            n_classes = self._n_classes(x)
            lam = torch.distributions.Beta(self.mixup, self.mixup).sample((x.shape[0], 1)).to(x)
            perm = torch.randperm(x.shape[0], device=x.device)
            onehot = F.one_hot(y, n_classes).to(x.dtype)
            x = lam * x + (1 - lam) * x[perm]
            y = lam * onehot + (1 - lam) * onehot[perm]
        return x, y

    def _n_classes(self, x: torch.Tensor) -> int:
        if self._classes is None:
            with torch.no_grad():
                self._classes = int(self.student(x[:1]).shape[1])
        return self._classes

    def _teacher_step(
        self, x: torch.Tensor, local: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if self.teacher_outputs is not None:
            rows = local.cpu()
            logits = self.teacher_outputs["logits"][rows].to(x.device)
            feats = {p: self.teacher_outputs[f"feat:{p}"][rows].to(x.device) for p in self.teacher_paths}
            return logits, feats
        if self.teacher is None:
            return None, {}
        with torch.no_grad():
            logits = self.teacher(x)
        return logits, dict(self._teacher_tap.features) if self._teacher_tap else {}

    def forward_train(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the weighted losses; `y` holds class indices or class probabilities."""
        logits = self.student(x)
        losses: dict[str, torch.Tensor] = {}
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(logits, y)
        if len(self.losses):
            local = self._local(index) if index is not None else torch.arange(x.shape[0], device=x.device)
            teacher_logits, teacher_feats = self._teacher_step(x, local)
            step = Step(
                student_logits=logits,
                teacher_logits=teacher_logits,
                target=y,
                index=local,
                student_feats=dict(self._student_tap.features) if self._student_tap else {},
                teacher_feats=teacher_feats,
            )
            for term in self.losses:
                losses[term.loss_name] = term.weight * term(step)
        return logits, losses

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        x, y = self._augment(x, y)
        logits, losses = self.forward_train(x, y, index)
        loss = sum(losses.values())
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        self._accumulate(losses)
        return loss

    def _accumulate(self, losses: dict[str, torch.Tensor]) -> None:
        """Sum each term's loss over the epoch; logged once per epoch.

        `self.log` costs about as much as a small student's whole forward pass, so calling it
        per term per step would make distillation look slower than it is.
        """
        for name, value in losses.items():
            self._epoch_terms[name] = self._epoch_terms.get(name, 0.0) + value.detach()
        self._epoch_steps += 1

    def on_train_epoch_start(self) -> None:
        self._epoch_terms: dict[str, torch.Tensor] = {}
        self._epoch_steps = 0

    def on_train_epoch_end(self) -> None:
        if self._epoch_steps:
            terms = {f"train_loss_{k}": v / self._epoch_steps for k, v in self._epoch_terms.items()}
            self.log_dict(terms, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.student(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # student, connectors, embedding heads
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def export(self) -> nn.Module:
        """The plain student, on CPU, in eval mode, without hooks: what gets evaluated and registered."""
        student = copy.deepcopy(self.student).cpu().eval()
        for module in student.modules():
            module._forward_hooks.clear()
        return student

    def close(self) -> None:
        """Remove the forward hooks this module put on the student and teacher."""
        for tap in (self._student_tap, self._teacher_tap):
            if tap is not None:
                tap.close()
