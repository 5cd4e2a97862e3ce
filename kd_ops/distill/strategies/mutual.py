"""`mutual` (deep mutual learning, Zhang et al. 2018): two or more peers learn together, each
pulled towards the others' predictions; none is frozen, no pre-trained teacher is needed."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import mlflow
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kd_ops.distill.losses.kd import kd_loss
from kd_ops.distill.module import DistillationModule, supervised_loss
from kd_ops.distill.strategies.strategy import Strategy, StudentTrainer, register_strategy
from kd_ops.models.zoo import Params


class MutualParams(Params):
    peers: int = Field(2, ge=2, le=8, description="students trained together")


def mutual_loss(logits: list[torch.Tensor], index: int, temperature: float) -> torch.Tensor:
    """Mean KL from each other peer's (detached) distribution to peer `index`'s, times T².

    Each peer is a fixed target for the others within a step, so gradients reach only the
    peer being updated; KL(p_other || p_self), the direction KD uses, not its reverse.
    """
    others = [z for j, z in enumerate(logits) if j != index]
    return sum(kd_loss(logits[index], z.detach(), temperature) for z in others) / len(others)
class MutualModule(DistillationModule):
    """Peers trained together: peer i minimises ce_weight·CE + kd_weight·mutual_loss(i).

    All peers update in the same step from the same batch. `export()` returns the peer with
    the best validation accuracy of the last epoch.
    """

    def __init__(self, student: nn.Module, peers: int, temperature: float, kd_weight: float, **kwargs):
        super().__init__(student, teacher=None, terms=None, **kwargs)
        self.peers = nn.ModuleList([student] + [self._fresh_copy(student, i) for i in range(1, peers)])
        self.temperature, self.kd_weight = temperature, kd_weight
        self._val_correct = torch.zeros(peers)
        self._val_seen = 0
        self.best_peer = 0

    @staticmethod
    def _fresh_copy(student: nn.Module, seed: int) -> nn.Module:
        """A peer of the same architecture with its own initialisation (normalisation kept)."""
        peer = copy.deepcopy(student)
        gen = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            for module in peer.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    bound = 1 / max(module.weight[0].numel(), 1) ** 0.5
                    module.weight.uniform_(-bound, bound, generator=gen)
                    if module.bias is not None:
                        module.bias.uniform_(-bound, bound, generator=gen)
        return peer

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        x, y = self._augment(x, y)
        logits = [peer(x) for peer in self.peers]
        t = self.temperature
        losses = {
            f"peer{i}": self.ce_weight * supervised_loss(z, y) + self.kd_weight * mutual_loss(logits, i, t)
            for i, z in enumerate(logits)
        }
        total = sum(losses.values())
        self.log("train_loss", total, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        self._accumulate(losses)
        return total

    def on_validation_epoch_start(self) -> None:
        self._val_correct = torch.zeros(len(self.peers))
        self._val_seen = 0

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        for i, peer in enumerate(self.peers):
            logits = peer(x)
            self._val_correct[i] += (logits.argmax(1) == y).sum().cpu()
            if i == 0:
                self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, on_epoch=True, sync_dist=True)
        self._val_seen += len(y)

    def on_validation_epoch_end(self) -> None:
        acc = self._val_correct / max(self._val_seen, 1)
        for i, a in enumerate(acc):
            self.log(f"val_accuracy_peer{i}", float(a))
        self.best_peer = int(acc.argmax())
        self.log("val_accuracy", float(acc.max()), prog_bar=True)

    def export(self) -> nn.Module:
        return copy.deepcopy(self.peers[self.best_peer]).cpu().eval()


@register_strategy("mutual")
class Mutual(Strategy):
    """Peers of the student's architecture trained together; the best on validation is the student."""

    Params = MutualParams
    needs_teacher: ClassVar[bool] = False

    def train(self, trainer: StudentTrainer, teacher: Any, initial: Any) -> tuple[Any, float]:
        mlflow.log_param("peers", self.params.peers)
        module = MutualModule(
            copy.deepcopy(initial),
            self.params.peers,
            self.cfg.temperature,
            self.cfg.kd_weight,
            **trainer.module_kwargs(self.cfg),
        )
        seconds = trainer.fit(module)
        return module.export(), seconds
