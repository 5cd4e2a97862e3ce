"""One experiment = one YAML file: every section, the checks across sections, its hash and flat form."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, model_validator

from kd_ops.config.base import _Section, check_gate_keys
from kd_ops.config.evaluation import EvaluationConfig
from kd_ops.config.loop import RedistillConfig, ReplayConfig
from kd_ops.config.monitoring import MonitorConfig
from kd_ops.config.tracking import RegistryConfig, TrackingConfig
from kd_ops.config.training import DataConfig, DistillConfig, StudentConfig, TeacherConfig, TrainConfig


class ExperimentConfig(_Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="further teachers (trained here or loaded by uri) for multi-teacher KD"
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    gates: dict[str, float] = Field(
        default_factory=dict,
        description="promotion gates: min_<metric> / max_<metric> -> threshold, on the student's test metrics",
    )
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    redistill: RedistillConfig = Field(default_factory=RedistillConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    allow_pickle: bool = Field(
        False,
        description="load model files (teacher.uri, the champion, kd-ops evaluate) even where loading lets code "
        "stored in them run: pickle models, pt2 archives with pickled records, skops types kd-ops does not "
        "trust; only for models from someone you trust",
    )

    @model_validator(mode="after")
    def _gate_keys(self) -> "ExperimentConfig":
        check_gate_keys(self.gates)
        return self

    @model_validator(mode="after")
    def _teacher_weights_fit(self) -> "ExperimentConfig":
        d = self.distill
        if d.combine == "weights":
            n = 1 + len(self.teachers)
            if len(d.teacher_weights) != n or sum(d.teacher_weights) <= 0 or min(d.teacher_weights) < 0:
                raise ValueError(
                    f"distill.teacher_weights = {d.teacher_weights}: combine 'weights' needs {n} non-negative "
                    f"weights (teacher + {len(self.teachers)} in teachers) with a positive sum"
                )
        return self

    def hash(self) -> str:
        """Fingerprint of everything that shapes the result (tracking location excluded)."""
        d = self.model_dump(
            mode="json",
            exclude={
                "tracking": True,
                "monitor": True,
                "redistill": True,
                "allow_pickle": True,  # how models are loaded, not what the recipe is
                "train": {"progress_bar"},
                "distill": {"cache": {"dir"}},
            },
        )
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params. The monitor and redistill sections stay out: they
        run the loop rather than shape the recipe, and hook settings (webhook URLs) can be secrets."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json", exclude={"monitor", "redistill"}))
        return out
