"""`data_free`: a student that never sees a real input, taught on inputs synthesised from the
teacher alone (for data that cannot be shared: devices, privacy).

The approach is a generator trained against the frozen teacher, as in DAFL (Chen et al. 2019),
with the two priors that made its successors work far better on small budgets:

- DAFL's terms: the teacher should be confident on a synthetic input (one-hot loss: cross-entropy
  to its own argmax) and, over a batch, use every class (information entropy of the mean
  prediction, maximised);
- DeepInversion's batch-norm prior (Yin et al. 2020), where the teacher has `BatchNorm` layers:
  each layer's batch statistics on synthetic inputs should match the running statistics it
  stored from its real training data, which pulls the inputs towards what the teacher saw;
- an adversarial term (Micaelli & Storkey 2019; Fang et al. 2019): the generator also seeks
  inputs where student and teacher still disagree, so the student is taught where it is wrong.

Why a generator rather than DeepInversion's per-batch optimisation of pixels: it works with any
differentiable teacher (with batch norms or without), every step draws fresh inputs at the cost
of one forward pass instead of thousands of pixel updates per batch, and it trains in the same
Lightning loop as every other student. The batch-norm prior is used when
the teacher has batch-norm layers (a network trained in the run, or one loaded by URI, whose
module tree keeps their running statistics); the run records whether it was (`data_free.bn_prior`).

Only the test and validation splits are read, to score the student; the training split is never
opened by this strategy. The student's input scaling is set from the pixel range (not the
training split's statistics). Every `grid_every` epochs a grid of synthetic inputs is logged as
an artifact (`data_free/samples-epoch-NNN.png`) so a user can see what the student learns from.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import lightning as L
import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.distill.losses.kd import kd_loss
from kd_ops.distill.module import plain_copy
from kd_ops.distill.strategies.strategy import Strategy, StudentTrainer, register_strategy
from kd_ops.models.zoo import Params


class DataFreeParams(Params):
    steps: int = Field(2000, ge=10, description="generator and student updates (one each per step)")
    batch_size: int = Field(128, ge=8, description="synthetic inputs per step")
    epochs: int = Field(20, ge=1, description="the steps are logged in this many epochs (validation, curves)")
    latent: int = Field(64, ge=4, description="size of the generator's noise vector")
    generator_lr: float = Field(1e-3, gt=0)
    one_hot_weight: float = Field(1.0, ge=0, description="DAFL: the teacher should be confident on a synthetic input")
    entropy_weight: float = Field(5.0, ge=0, description="DAFL: over a batch, the teacher should use every class")
    bn_weight: float = Field(1.0, ge=0, description="DeepInversion: match the teacher's batch-norm statistics")
    adversarial_weight: float = Field(1.0, ge=0, description="seek inputs where the student still disagrees")
    grid_every: int = Field(5, ge=1, description="log a grid of synthetic inputs every this many epochs")


class Generator(nn.Module):
    """DAFL's generator: noise -> a small feature map, upsampled twice, -> an image in [0, max_value]."""

    def __init__(self, latent: int, shape: tuple[int, int, int], max_value: float, width: int = 64):
        super().__init__()
        c, h, w = shape
        self.shape, self.max_value = shape, float(max_value)
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        features = 2 * width * self.h0 * self.w0
        self.project = nn.Sequential(nn.Linear(latent, features), nn.BatchNorm1d(features))
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, padding=1),
        )
        self.width = width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        x = self.project(z).view(len(z), 2 * self.width, self.h0, self.w0)
        x = self.body(x)[:, :, :h, :w]
        return (torch.sigmoid(x) * self.max_value).reshape(len(z), -1)


def _own_buffer(module: nn.Module, name: str) -> bool:
    return isinstance(dict(module.named_buffers(recurse=False)).get(name), torch.Tensor)


class BatchNormPrior:
    """Forward hooks on a teacher's BatchNorm layers: the distance between each layer's batch
    statistics on the current input and the running statistics of its training data."""

    def __init__(self, teacher: nn.Module):
        # By their running statistics, not their class: a teacher loaded by URI comes back as
        # torch.export's module tree, whose batch-norm layers keep their buffers but not their type.
        self.layers = [m for m in teacher.modules() if _own_buffer(m, "running_mean") and _own_buffer(m, "running_var")]
        self.losses: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.ndim)]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def take(self) -> torch.Tensor | None:
        out = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses = []
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


class DataFreeModule(L.LightningModule):
    """Alternating updates: the generator against the frozen teacher (and the student), then the
    student towards the teacher on fresh synthetic inputs. Validation reads the real val split."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        p: DataFreeParams,
        input_shape: tuple[int, int, int],
        max_value: float,
        temperature: float,
        lr: float,
        weight_decay: float,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.student, self.p = student, p
        self.generator = Generator(p.latent, input_shape, max_value)
        object.__setattr__(self, "teacher", teacher)  # frozen, not a submodule (as in DistillationModule)
        self.temperature, self.lr, self.weight_decay = temperature, lr, weight_decay
        self.prior = BatchNormPrior(teacher) if p.bn_weight > 0 else None
        self.bn_prior = bool(self.prior and self.prior.layers)
        self.steps_per_epoch = max(1, math.ceil(p.steps / p.epochs))
        self.epochs = p.epochs  # what the trainer runs: the module brings its own (synthetic) batches
        self._grid_z = torch.randn(64, p.latent, generator=torch.Generator().manual_seed(0))
        self.grids: list[str] = []

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def configure_optimizers(self):
        opt_s = torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.p.generator_lr, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=self.p.epochs)
        return [opt_s, opt_g], [sched]

    def synthetic_loader(self) -> torch.utils.data.DataLoader:
        """Step numbers, one per batch: the inputs themselves are drawn in `training_step`."""
        steps = torch.arange(self.steps_per_epoch)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(steps), batch_size=1)

    def _z(self) -> torch.Tensor:
        return torch.randn(self.p.batch_size, self.p.latent, device=self.device)

    def training_step(self, batch, batch_idx):
        opt_s, opt_g = self.optimizers()
        p = self.p
        # Generator: inputs the teacher is sure of, over all classes, like its training data,
        # and where the student still disagrees with it.
        self.generator.train()
        x = self.generator(self._z())
        if self.prior is not None:
            self.prior.take()
        t = self.teacher(x)
        bn = self.prior.take() if self.prior is not None else None
        mean_p = t.softmax(1).mean(0)
        losses = {
            "one_hot": p.one_hot_weight * F.cross_entropy(t, t.argmax(1)),
            "entropy": p.entropy_weight * (mean_p * mean_p.clamp_min(1e-8).log()).sum(),
        }
        if bn is not None and self.bn_prior:
            losses["bn"] = p.bn_weight * bn
        if p.adversarial_weight:
            losses["adversarial"] = -p.adversarial_weight * F.l1_loss(self.student(x).softmax(1), t.softmax(1))
        loss_g = sum(losses.values())
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        # Student: towards the teacher on fresh synthetic inputs.
        with torch.no_grad():
            x = self.generator(self._z())
            t = self.teacher(x)
            if self.prior is not None:
                self.prior.take()
        loss_s = kd_loss(self.student(x), t, self.temperature)
        opt_s.zero_grad()
        self.manual_backward(loss_s)
        opt_s.step()
        self.log_dict(
            {"train_loss": loss_s, **{f"train_loss_generator_{k}": v for k, v in losses.items()}},
            on_step=False,
            on_epoch=True,
        )

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()  # manual optimisation steps its schedule by hand
        epoch = self.current_epoch + 1
        if epoch % self.p.grid_every == 0 or epoch == self.trainer.max_epochs:
            self._log_grid(epoch)

    def _log_grid(self, epoch: int) -> None:
        """A grid of 64 synthetic inputs (fixed noise, so grids compare across epochs)."""
        if mlflow.active_run() is None:
            return
        self.generator.eval()
        with torch.no_grad():
            x = self.generator(self._grid_z.to(self.device)).cpu().numpy()
        c, h, w = self.generator.shape
        images = x.reshape(8, 8, c, h, w).mean(2) / self.generator.max_value  # greyscale, [0, 1]
        images = np.pad(images, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=0.5)  # a grey rule between
        h, w = h + 1, w + 1
        grid = images.transpose(0, 2, 1, 3).reshape(8 * h, 8 * w)
        scale = max(1, 128 // max(h, w))
        grid = np.kron(grid, np.ones((scale, scale)))
        name = f"data_free/samples-epoch-{epoch:03d}.png"
        mlflow.log_image((grid * 255).clip(0, 255).astype(np.uint8), name)
        self.grids.append(name)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.student(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True)
        with torch.no_grad():
            t = self.teacher(x)
            if self.prior is not None:
                self.prior.take()
        self.log("val_agreement_with_teacher", (logits.argmax(1) == t.argmax(1)).float().mean(), on_epoch=True)

    def export(self) -> nn.Module:
        return plain_copy(self.student)

    def close(self) -> None:
        if self.prior is not None:
            self.prior.close()


@register_strategy("data_free")
class DataFree(Strategy):
    """A student distilled on synthetic inputs only (see the module's docstring)."""

    Params = DataFreeParams
    training_rows: ClassVar[str] = "none"

    @classmethod
    def problems(cls, cfg: ExperimentConfig) -> list[str]:
        out = super().problems(cfg)
        d = cfg.distill
        for key in ("mixup", "cutmix", "jitter", "swap_noise"):
            if getattr(d, key):
                out.append(f"distill.{key} = {getattr(d, key)}: data_free reads no real input to augment; set it to 0")
        if d.losses:
            out.append("distill.losses: data_free trains with its own terms; remove distill.losses")
        from kd_ops.data.datasets import names_a_table

        if names_a_table(cfg.data):
            out.append(f"distill.method = 'data_free' synthesises images; data {cfg.data.source_name!r} is a table")
        return out

    def train(self, trainer: StudentTrainer, teacher: Any, initial: Any) -> tuple[Any, float]:
        from kd_ops.core.errors import ConfigError

        dm = trainer.dm
        shape = tuple(dm.input_shape)
        if dm.schema is not None or len(shape) != 3:
            raise ConfigError(
                "distill.method = 'data_free' synthesises images (channels, height, width); "
                f"data {dm.cfg.source_name!r} has rows of shape {shape}"
            )
        student = copy.deepcopy(initial)
        max_value = float(dm.raw.max_value)
        if hasattr(student, "normalize"):  # the pixel range, not the (unseen) training split's statistics
            with torch.no_grad():
                student.normalize.mean.fill_(max_value / 2)
                student.normalize.std.fill_(max_value / 2)
        section = trainer.cfg.student
        module = DataFreeModule(
            student, teacher, self.params, shape, max_value, self.cfg.temperature, section.lr, section.weight_decay
        )
        layers = len(module.prior.layers) if module.prior else 0
        mlflow.log_params({"data_free.bn_prior": module.bn_prior, "data_free.bn_layers": layers})
        seconds = trainer.fit(module, "none")
        mlflow.log_param("data_free.grids", len(module.grids))
        return module.export(), seconds
