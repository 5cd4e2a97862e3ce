"""`born_again` (Furlanello et al. 2018): generation k teaches generation k+1 of the same
architecture, starting from the teacher; the last generation is the student. Each generation is
a run nested inside the one that taught it."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import mlflow
from pydantic import Field

from kd_ops.distill.strategies.loss_terms import LossTerms
from kd_ops.distill.strategies.strategy import Strategy, StudentTrainer, register_strategy
from kd_ops.models.zoo import Params, freeze


class BornAgainParams(Params):
    generations: int = Field(2, ge=1, le=10, description="student generations after the teacher")


@register_strategy("born_again")
class BornAgain(Strategy):
    """A chain of KD students: each generation's student is the next generation's teacher."""

    Params = BornAgainParams
    teacher_loss: ClassVar[str | None] = "kd"

    def train(self, trainer: StudentTrainer, teacher: Any, initial: Any) -> tuple[Any, float]:
        kd = LossTerms(self.cfg.model_copy(update={"method": "kd", "params": {}}))
        current, seconds = teacher, 0.0
        with contextlib.ExitStack() as chain:  # each generation's run stays open while the next one trains
            for gen in range(1, self.params.generations + 1):
                tags = {"kd_ops.generation": str(gen)}
                chain.enter_context(trainer.child_run(f"generation-{gen}", "generation", **tags))
                mlflow.log_params({"generation": gen, **trainer.student_params()})
                student, gen_seconds = kd.train(trainer, current, trainer.new_student(1 + gen))
                seconds += gen_seconds
                mlflow.log_metrics({**trainer.evaluate(student), "train_time_s": gen_seconds})
                current = freeze(student)
        return current, seconds
