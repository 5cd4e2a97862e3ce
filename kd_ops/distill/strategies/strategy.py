"""The contract of a training strategy: how a student learns from a config's `distill` section.

`distill.method` names a strategy. A strategy declares its params (a pydantic schema, so a typo
is a config error naming the key), whether its student learns from a teacher, whether the student
is a network built from `student.model`, the labels-only baseline it is compared with, and how it
trains. The pipeline looks the name up in `STRATEGIES` and calls these; it branches on no name.

Register your own: a subclass in its own file, decorated with `@register_strategy("name")`, in a
module that is imported (a package's `kd_ops.distill.strategies` entry point, or before the config loads):

    @register_strategy("my_method")
    class MyStrategy(Strategy):
        Params = MyParams
        def train(self, trainer, teacher, initial):
            module = trainer.distillation_module(initial, teacher, self.loss_terms())
            return module.export(), trainer.fit(module)

Any name in the loss registry (`kd`, `dkd`, `hint`, ...) is the `loss_terms` strategy with that
loss against a frozen teacher (`kd_ops.distill.strategies.loss_terms`).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.training import DistillConfig
from kd_ops.core.registry import Registry, param_errors


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentTrainer(Protocol):
    """What the pipeline hands a strategy: training on the run's transfer set, tracked in its run."""

    cfg: ExperimentConfig
    dm: Any  # the run's DistillDataModule (all splits)

    def new_student(self, seed_offset: int) -> Any:
        """A fresh student network of `student.model`, seeded `cfg.seed + seed_offset`."""

    def module_kwargs(self, method_cfg: DistillConfig) -> dict[str, Any]:
        """The keyword arguments every `DistillationModule` of this run takes (weights, lr, rows)."""

    def distillation_module(self, student: Any, teacher: Any, method_cfg: DistillConfig, terms: list) -> Any:
        """A `DistillationModule` for `terms`, with the teacher's outputs from the cache when they can be."""

    def fit(self, module: Any, rows: str = "transfer") -> float:
        """Train a LightningModule under the run's Lightning strategy; seconds taken. `rows`:
        `transfer` (every transfer row; unlabelled ones carry label -1) or `labelled` (only the
        transfer rows that keep their labels, `data.labelled_fraction`)."""

    def student_params(self) -> dict[str, Any]:
        """The student section as MLflow params (`model`, `epochs`, `model.<param>`, ...)."""

    def evaluate(self, model: Any) -> dict[str, float]:
        """The test-split metrics every role logs."""

    def child_run(self, name: str, role: str, **tags: str) -> contextlib.AbstractContextManager:
        """A nested MLflow run under the current one."""


class Strategy:
    """One way of training a student. Subclasses set the class attributes and implement `train`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_teacher: ClassVar[bool] = True  # the student learns from the teacher's outputs
    network_student: ClassVar[bool] = True  # the student is built from `student.model` (else from params)
    teacher_loss: ClassVar[str | None] = None  # the loss term against the teacher, weighted `kd_weight`
    # Which transfer rows training reads: `labelled` for a student of labels alone (it never sees
    # the rows whose labels `data.labelled_fraction` withholds), `transfer` for all of them.
    training_rows: ClassVar[str] = "transfer"

    def __init__(self, method_cfg: DistillConfig):
        self.cfg = method_cfg
        self.params = self.schema_for(method_cfg.method).model_validate(method_cfg.params)

    @classmethod
    def schema_for(cls, method: str) -> type[BaseModel]:
        """The schema of `distill.params` for `distill.method: method`."""
        return cls.Params

    @classmethod
    def problems(cls, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with `cfg` for this strategy, one line each, naming the key."""
        d = cfg.distill
        out = param_errors(cls.schema_for(d.method), d.params, "distill.params", f"method {d.method!r}")
        if d.kd_weight == 0 and d.ce_weight == 0 and not d.losses:
            out.append("distill: kd_weight and ce_weight are both 0: nothing would be learned")
        return out

    def own_loss(self) -> str | None:
        """The loss term against the teacher that this strategy adds (weight `kd_weight`)."""
        return self.teacher_loss

    def loss_terms(self) -> list:
        """The weighted loss terms beside cross-entropy: this strategy's own, then `distill.losses`."""
        from kd_ops.distill.losses import build_losses

        return build_losses(self.cfg, self.own_loss())

    def run_params(self) -> dict[str, Any]:
        """What the student run logs about the method (beside the student's own params)."""
        out: dict[str, Any] = {"method": self.cfg.method}
        if self.needs_teacher:
            out.update(temperature=self.cfg.temperature, kd_weight=self.cfg.kd_weight)
            if self.cfg.method_weight is not None:
                out["method_weight"] = self.cfg.method_weight
        out.update({f"method.{k}": v for k, v in self.cfg.params.items()})
        out.update({f"loss.{i}": f"{s.name}*{s.weight}" for i, s in enumerate(self.cfg.losses)})
        return out

    def baseline(self) -> DistillConfig:
        """The labels-only student this one is compared with: same architecture, no teacher."""
        return self.cfg.model_copy(update={"method": "none", "losses": [], "params": {}})

    def student_name(self, cfg: ExperimentConfig) -> str:
        """The student's architecture, as the model card names it."""
        return cfg.student.model

    def train(self, trainer: StudentTrainer, teacher: Any, initial: Any) -> tuple[Any, float]:
        """Train one student; return the plain model (nothing of the wrapper) and the seconds taken.
        `teacher` is None when `needs_teacher` is false; `initial` the shared initial weights (a copy
        to train from) when `network_student`."""
        raise NotImplementedError


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str):
    """`@register_strategy("name")` on a `Strategy` subclass: `distill.method: name` then selects it."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        STRATEGIES.register(name)(cls)
        return cls

    return decorator
