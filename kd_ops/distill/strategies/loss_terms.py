"""The plain strategy: a student trained with cross-entropy plus weighted loss terms against a
frozen teacher. Every name in the loss registry (`kd`, `dkd`, `hint`, `attention`, `rkd`, `pkt`,
`crd`, and any registered since) is this strategy with that loss; `none` is the labels-only
student (cross-entropy alone, no teacher), which is also every strategy's default baseline."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from pydantic import BaseModel

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.registry import param_errors
from kd_ops.distill.strategies.strategy import Strategy, StudentTrainer, register_strategy


class LossTerms(Strategy):
    """`distill.method` names a loss: that loss (weight `kd_weight`, params `distill.params`) plus
    `distill.losses`, against the frozen teacher. Found by `strategy_for` for any loss name."""

    name = "loss_terms"

    @classmethod
    def schema_for(cls, method: str) -> type[BaseModel]:
        from kd_ops.distill.losses import LOSSES

        return LOSSES.get(method).Params

    def own_loss(self) -> str | None:
        return self.cfg.method

    def train(self, trainer: StudentTrainer, teacher: Any, initial: Any) -> tuple[Any, float]:
        module = trainer.distillation_module(copy.deepcopy(initial), teacher, self.cfg, self.loss_terms())
        seconds = trainer.fit(module, self.training_rows)
        return module.export(), seconds


@register_strategy("none")
class LabelsOnly(LossTerms):
    """Cross-entropy on the labels alone (plus any `distill.losses` that need no teacher)."""

    needs_teacher: ClassVar[bool] = False
    training_rows: ClassVar[str] = "labelled"

    @classmethod
    def schema_for(cls, method: str) -> type[BaseModel]:
        return cls.Params

    def own_loss(self) -> str | None:
        return None

    @classmethod
    def problems(cls, cfg: ExperimentConfig) -> list[str]:
        d = cfg.distill  # cross-entropy is forced on when no term is left: nothing to check on weights
        return param_errors(cls.Params, d.params, "distill.params", f"method {d.method!r}")
