"""The distiller: a LightningModule around a frozen teacher and a trainable student.

The contract follows mdistiller: `forward_train(x, y) -> (logits, {loss_name: weighted_loss})`,
which maps straight onto `training_step`. With no teacher and no loss terms it is plain
supervised training, which is how the teacher and the labels-only baseline are trained: one
code path for all three. `export()` hands back the plain student; nothing of the wrapper
(teacher, losses, optimiser state) reaches the registry.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kd_ops.losses import LossTerm
from kd_ops.models import freeze


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: list[LossTerm] | None = None,
        ce_weight: float = 1.0,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        jitter: float = 0.0,
        mixup: float = 0.0,
    ):
        super().__init__()
        self.student = student
        self.terms = list(terms or [])
        if any(t.needs_teacher for t in self.terms) and teacher is None:
            raise ValueError("these loss terms need a teacher: " + ", ".join(t.name for t in self.terms))
        # Not a registered submodule: Lightning's train()/eval() toggles, the optimiser, device
        # strategies and checkpoints never see the teacher. It is frozen here and moved by hand.
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            freeze(teacher)
        self.ce_weight, self.lr, self.weight_decay = ce_weight, lr, weight_decay
        self.jitter, self.mixup = jitter, mixup
        self._classes: int | None = None
        self.save_hyperparameters(ignore=["student", "teacher", "terms"])

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def _augment(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Jitter and mixup of the training rows: new inputs for the teacher to label.

        Jitter adds Gaussian noise in standardized units. Mixup blends pairs of rows; the hard
        target becomes the same blend of one-hot labels, while a teacher labels the blended
        input itself, which is where distillation gains most on a small transfer set.
        """
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

    def forward_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the weighted losses; `y` holds class indices or class probabilities."""
        logits = self.student(x)
        losses: dict[str, torch.Tensor] = {}
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(logits, y)
        if self.terms:
            with torch.no_grad():
                teacher_logits = self.teacher(x) if self.teacher is not None else None
            for term in self.terms:
                losses[term.name] = term.weight * term.fn(logits, teacher_logits)
        return logits, losses

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits, losses = self.forward_train(*self._augment(x, y))
        loss = sum(losses.values())
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        for name, value in losses.items():
            self.log(f"train_loss_{name}", value, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.student(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, on_epoch=True)
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def export(self) -> nn.Module:
        """The plain student, on CPU, in eval mode: what gets evaluated and registered."""
        return copy.deepcopy(self.student).cpu().eval()
