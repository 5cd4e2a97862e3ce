"""Config section `evaluation`: what is measured beside accuracy, and how long to time it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kd_ops.config.base import _Section


class EvaluationConfig(_Section):
    latency_repeats: int = Field(200, ge=5, description="batch-of-1 calls timed for latency percentiles")
    throughput_batch: int = Field(256, ge=1, description="the batch size of `throughput_per_s`")
    throughput_batches: list[int] = Field(
        default_factory=lambda: [1, 32, 256], description="throughput is also logged at each of these batch sizes"
    )
    throughput_repeats: int = Field(20, ge=1)
    robustness: bool = Field(True, description="accuracy under the dataset's corruptions (noise, shift, contrast)")
    edge: list[Literal["onnx", "onnx_int8"]] = Field(
        default_factory=list, description="edge exports of the student evaluated as further candidates"
    )

    @model_validator(mode="after")
    def _positive_batches(self) -> "EvaluationConfig":
        bad = [b for b in self.throughput_batches if not isinstance(b, int) or b < 1]
        if bad:
            raise ValueError(f"evaluation.throughput_batches = {self.throughput_batches}: sizes must be >= 1")
        return self
