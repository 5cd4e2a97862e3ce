"""`sklearn`: a scikit-learn model (a tree, boosted trees, a linear model) fitted on the teacher's
soft targets, optionally over jittered copies of the transfer rows that the teacher labels too
(`kd_ops.models.sklearn_students`). Its baseline is the same model fitted on the hard labels."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from pydantic import Field

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.training import DistillConfig
from kd_ops.core.registry import UnknownComponentError, param_errors
from kd_ops.distill.strategies.strategy import Strategy, StudentTrainer, register_strategy
from kd_ops.models.zoo import Params


class SklearnParams(Params):
    model: str = Field("decision_tree", description="decision_tree, gradient_boosting or logistic_regression")
    params: dict[str, Any] = Field(default_factory=dict)
    jitter_copies: int = Field(0, ge=0, le=50, description="noisy copies of each transfer row, labelled by the teacher")
    jitter: float = Field(0.1, ge=0, description="std of the copies' noise, in standardized units")
    min_weight: float = Field(1e-3, ge=0, lt=1, description="soft-target probabilities below this are dropped")
    hard_labels: bool = Field(False, description="fit on the true labels instead (the baseline)")


@register_strategy("sklearn")
class ScikitLearn(Strategy):
    """The student is a scikit-learn estimator named in `distill.params.model`, not `student.model`."""

    Params = SklearnParams
    network_student: ClassVar[bool] = False

    @classmethod
    def problems(cls, cfg: ExperimentConfig) -> list[str]:
        d = cfg.distill
        out = param_errors(cls.Params, d.params, "distill.params", f"method {d.method!r}")
        if out:
            return out
        from kd_ops.models.sklearn_students import SKLEARN_MODELS

        p = cls.Params.model_validate(d.params)
        try:
            entry = SKLEARN_MODELS.get(p.model)
        except UnknownComponentError as exc:
            return [f"distill.params.model = {p.model!r}: {exc}"]
        return param_errors(entry.params, p.params, "distill.params.params", f"sklearn model {p.model!r}")

    def baseline(self) -> DistillConfig:
        """The same scikit-learn model fitted on hard labels: the teacher's probabilities replaced by one-hot."""
        return self.cfg.model_copy(update={"params": {**self.cfg.params, "hard_labels": True}})

    def student_name(self, cfg: ExperimentConfig) -> str:
        return self.params.model

    def train(self, trainer: StudentTrainer, teacher: Any, initial: Any) -> tuple[Any, float]:
        from kd_ops.models.sklearn_students import distill_to_sklearn

        t0 = time.perf_counter()
        own = getattr(trainer, "student_estimator", None)  # the user's estimator, through the Python API
        d = self.cfg
        hard = d.ce_weight / (d.ce_weight + d.kd_weight) if d.ce_weight + d.kd_weight > 0 else 0.0
        model = distill_to_sklearn(self.params, d.temperature, teacher, trainer.dm, trainer.cfg.seed, own, hard)
        return model, time.perf_counter() - t0
