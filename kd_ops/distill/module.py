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


def supervised_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows that carry a label, averaged over their label mass.

    `y` holds class indices (-1: no label, `data.labelled_fraction`) or class probabilities
    whose rows sum to the share of the row that is labelled (a mixup of a labelled and an
    unlabelled row is half labelled; an unlabelled row is all zeros). A batch without labels
    gives 0, so the teacher's terms alone train on it."""
    if y.ndim == 1:
        known = y >= 0
        if bool(known.all()):
            return F.cross_entropy(logits, y)
        if not bool(known.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[known], y[known])
    mass = y.sum()
    if float(mass) <= 0:
        return logits.sum() * 0.0
    return -(y * F.log_softmax(logits, 1)).sum() / mass


def plain_copy(student: nn.Module) -> nn.Module:
    """A copy of a trained student on CPU, in eval mode, without the forward hooks that taps put
    on it: what every training module exports for evaluation and the registry."""
    student = copy.deepcopy(student).cpu().eval()
    for module in student.modules():
        module._forward_hooks.clear()
    return student


def one_hot_known(y: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows of class indices; a row without a label (-1) is all zeros."""
    return F.one_hot(y.clamp_min(0), n_classes).to(dtype) * (y >= 0).unsqueeze(1).to(dtype)


def cutmix(
    x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019) on flat image rows: a box of `perm`'s image pasted into each row,
    one box per batch of area about 1 - lam; the soft target is mixed by the box's true area."""
    c, h, w = shape
    images = x.reshape(len(x), c, h, w).clone()
    ratio = float((1 - lam).clamp(0, 1) ** 0.5)
    bh, bw = max(int(round(h * ratio)), 0), max(int(round(w * ratio)), 0)
    top = int(torch.randint(0, h - bh + 1, (1,)))
    left = int(torch.randint(0, w - bw + 1, (1,)))
    images[:, :, top : top + bh, left : left + bw] = images[perm][:, :, top : top + bh, left : left + bw]
    area = bh * bw / (h * w)
    return images.reshape(len(x), -1), (1 - area) * y + area * y[perm]


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
        cutmix: float = 0.0,
        swap_noise: float = 0.0,
        input_shape: tuple[int, ...] | None = None,
        rows: np.ndarray | None = None,
        teacher_outputs: dict[str, torch.Tensor] | None = None,
        corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`rows`: dataset row indices of the training rows, in the order of `teacher_outputs`.
        `corrupt`: a batch -> batch augmentation of raw rows (a robust teacher, see `kd_ops.data.corrupt_some`).
        `cutmix`: Beta(a, a) of CutMix boxes (images of `input_shape`); with `mixup` too, each
        batch takes one of the two at random (the function-matching recipe). `swap_noise`: the
        share of values replaced by the same column's value in another row of the batch (a
        table's augmentation: category codes stay valid codes)."""
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
        self.swap_noise = swap_noise
        self.cutmix, self.input_shape = cutmix, tuple(input_shape) if input_shape else None
        if cutmix and (self.input_shape is None or len(self.input_shape) != 3):
            raise ValueError(f"cutmix needs image rows (channels, height, width), got input shape {input_shape}")
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
        self._val_teacher: dict[int, torch.Tensor] = {}  # teacher logits per validation batch
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
        """Jitter, mixup and CutMix of the training rows: new inputs for the teacher to label.

        Jitter adds Gaussian noise in standardized units; swap noise takes some values from
        other rows (Porto Seguro's denoising trick, valid for tables). Mixup blends pairs of rows, CutMix
        pastes a box of one image into another; the hard target becomes the same blend of
        one-hot labels (an unlabelled row adds no label mass), while a teacher labels the new
        input itself, which is where distillation gains most on a small transfer set.
        """
        if self.corrupt is not None:
            x = self.corrupt(x)
        if self.jitter:
            std = self.student.normalize.std if hasattr(self.student, "normalize") else 1.0
            x = x + torch.randn_like(x) * self.jitter * std
        if self.swap_noise:
            donors = torch.randint(0, x.shape[0], x.shape, device=x.device)
            x = torch.where(torch.rand_like(x) < self.swap_noise, torch.gather(x, 0, donors), x)
        if self.mixup or self.cutmix:
            use_cutmix = bool(self.cutmix) and (not self.mixup or bool(torch.rand(()) < 0.5))
            alpha = self.cutmix if use_cutmix else self.mixup
            onehot = one_hot_known(y, self._n_classes(x), x.dtype)
            perm = torch.randperm(x.shape[0], device=x.device)
            beta = torch.distributions.Beta(alpha, alpha)
            if use_cutmix:
                x, y = cutmix(x, onehot, beta.sample(()), perm, self.input_shape)
            else:
                lam = beta.sample((x.shape[0], 1)).to(x)
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
            losses["ce"] = self.ce_weight * supervised_loss(logits, y)
        if len(self.losses):
            local = self._local(index) if index is not None else torch.arange(x.shape[0], device=x.device)
            teacher_logits, teacher_feats = self._teacher_step(x, local)
            step = Step(
                student_logits=logits,
                teacher_logits=teacher_logits,
                target=self._filled(y, teacher_logits),
                index=local,
                student_feats=dict(self._student_tap.features) if self._student_tap else {},
                teacher_feats=teacher_feats,
            )
            for term in self.losses:
                losses[term.loss_name] = term.weight * term(step)
        return logits, losses

    @staticmethod
    def _filled(y: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """The target the loss terms see: where a row has no label (or only part of one, after
        mixup) the teacher's prediction fills it in, so a term that reads the class (DKD's
        target class) works on unlabelled rows too."""
        if teacher_logits is None:
            return y
        if y.ndim == 1:
            return y if bool((y >= 0).all()) else torch.where(y >= 0, y, teacher_logits.argmax(1))
        missing = (1 - y.sum(1, keepdim=True)).clamp_min(0)
        return y if float(missing.max()) < 1e-6 else y + missing * teacher_logits.float().softmax(1).to(y.dtype)

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
        if self.teacher is not None and len(self.losses):
            # Fidelity per epoch (Stanton et al. 2021): how closely the student matches the
            # teacher's function, top-1 and in distribution, which is what patience buys.
            teacher_logits = self._val_teacher_logits(x, batch_idx)
            self.log(
                "val_agreement_with_teacher",
                (logits.argmax(1) == teacher_logits.argmax(1)).float().mean(),
                on_epoch=True,
                sync_dist=True,
            )
            kl = F.kl_div(
                F.log_softmax(logits.float(), 1),
                F.log_softmax(teacher_logits, 1),
                log_target=True,
                reduction="batchmean",
            )
            self.log("val_kl_to_teacher", kl, on_epoch=True, sync_dist=True)

    def _val_teacher_logits(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The teacher's logits of a validation batch, computed at the first validation and kept:
        the val rows never change, and a large teacher would otherwise cost more each epoch than
        the student's training (the val loader is not shuffled, so batch `i` is the same rows)."""
        kept = self._val_teacher.get(batch_idx)
        if kept is None or kept.shape[0] != x.shape[0]:
            with torch.no_grad():
                kept = self.teacher(x).float()
            self._val_teacher[batch_idx] = kept
        return kept

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # student, connectors, embedding heads
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def export(self) -> nn.Module:
        """The plain student, on CPU, in eval mode, without hooks: what gets evaluated and registered."""
        return plain_copy(self.student)

    def close(self) -> None:
        """Remove the forward hooks this module put on the student and teacher."""
        for tap in (self._student_tap, self._teacher_tap):
            if tap is not None:
                tap.close()
