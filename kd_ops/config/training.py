"""Config sections of a distillation: data, teacher(s), student, method and losses, training."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kd_ops.config.base import _Section


class DataConfig(_Section):
    name: str = Field("digits", description="a registered dataset (digits, mnist5k, flights, churn, a plugin's)")
    path: str | None = Field(
        None, description="a CSV or Parquet file of your own (relative to the config file); not with data.name"
    )
    label: str | None = Field(None, description="the column to predict (a table)")
    features: list[str] | None = Field(None, description="feature columns (default: every other column)")
    categorical: list[str] = Field(default_factory=list, description="columns read as categories (over inference)")
    numeric: list[str] = Field(default_factory=list, description="columns read as numbers (overrides inference)")
    boolean: list[str] = Field(default_factory=list, description="columns read as true/false (overrides inference)")
    text: list[str] = Field(
        default_factory=list, description="columns of free text: tokenised with a BPE fitted on the training split"
    )
    max_length: int = Field(128, ge=1, le=4096, description="text: tokens kept per text (longer ones are truncated)")
    vocab_size: int = Field(8000, ge=300, le=200000, description="text: the tokenizer's vocabulary size")
    time: str | None = Field(None, description="the column that orders rows in time (a table)")
    slices: list[str] = Field(default_factory=list, description="feature columns to report per-slice accuracy by")
    split: Literal["random", "time"] | None = Field(
        None, description="random (stratified) or time (train on the past, validate and test on later rows)"
    )
    rows: int | None = Field(None, ge=10, description="use this many rows of a table (a random sample, in order)")
    until: str | None = Field(
        None,
        description="a table with data.time: keep only rows before this time (e.g. 2013-04: what was known when"
        " the first student was distilled; `kd-ops replay` sends the later rows as traffic)",
    )
    train_fraction: float = Field(1.0, gt=0, le=1, description="share of the training split used as transfer set")
    labelled_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the transfer set that keeps its labels (stratified); the rest is unlabelled: the"
        " student learns it from the teacher's outputs alone and the labels-only baseline never sees it",
    )
    exclude_classes: list[int] = Field(default_factory=list, description="classes left out of the transfer set")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.path is not None and "name" in self.model_fields_set:
            raise ValueError(f"data.name = {self.name!r} and data.path = {self.path!r}: give one of them")
        if self.path is not None and not self.label:
            raise ValueError(f"data.path = {self.path!r} needs data.label: the column to predict")
        if self.split == "time" and not self.time and self.path is not None:
            raise ValueError("data.split = 'time' needs data.time: the column that orders the rows")
        if self.until is not None:
            import pandas as pd

            try:
                pd.Timestamp(self.until)
            except ValueError:
                raise ValueError(f"data.until = {self.until!r} is not a time (e.g. 2013-04 or 2013-04-15)") from None
        return self

    @property
    def is_file(self) -> bool:
        return self.path is not None

    @property
    def source_name(self) -> str:
        """What runs, plots and lineage call the data: the dataset's name or the file's stem."""
        if self.path is None:
            return self.name
        from pathlib import Path

        return Path(self.path).name.split(".")[0] or "table"


class ModelSection(_Section):
    model: str
    params: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(20, ge=1)
    min_steps: int = Field(
        0, ge=0, description="train at least this many optimizer steps: small transfer sets get more epochs"
    )
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)


class TeacherConfig(ModelSection):
    model: str = "cnn"
    uri: str | None = Field(None, description="an existing MLflow model URI used instead of training a teacher")
    augment: list[str] = Field(
        default_factory=list, description="corruptions (noise, shift, contrast) a trained teacher learns to read"
    )
    augment_share: float = Field(0.5, gt=0, le=1, description="share of each batch that gets a corruption")


class StudentConfig(ModelSection):
    model: str = "mlp"


class LossSpec(_Section):
    name: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class CacheConfig(_Section):
    enabled: bool = Field(True, description="reuse teacher outputs across epochs and runs when inputs do not change")
    dir: str = Field(".kd-ops/cache", description="where cached teacher outputs are kept")
    top_k: int | None = Field(None, ge=1, description="keep only the top-k logits per row (many classes)")


class DistillConfig(_Section):
    method: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict, description="parameters of the method")
    losses: list[LossSpec] = Field(default_factory=list, description="further weighted loss terms")
    temperature: float = Field(4.0, gt=0)
    kd_weight: float = Field(0.9, ge=0)
    method_weight: float | None = Field(
        None,
        ge=0,
        description="weight of a feature or relation method's own term (crd, rkd, pkt, hint, attention), which"
        " trains beside plain KD at kd_weight; default: the method's own (docs/methods.md)",
    )
    ce_weight: float = Field(0.1, ge=0)
    jitter: float = Field(
        0.0, ge=0, description="std of Gaussian noise (in standardized units) added to transfer inputs each step"
    )
    mixup: float = Field(
        0.0, ge=0, description="mixup Beta(a, a) on transfer inputs each step (0 = off); the teacher labels the blends"
    )
    cutmix: float = Field(
        0.0, ge=0, description="CutMix Beta(a, a) boxes on image inputs each step (0 = off); with mixup, one per batch"
    )
    swap_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of feature values replaced by the same column's value in another row of the batch"
        " (tables and images; 0 = off): new inputs for the teacher to label",
    )
    recipe: str = Field(
        "standard",
        description="a preset of the keys above: function_matching (Beyer et al. 2022) has teacher and student"
        " see the same fresh augmented view each step, for a long schedule; keys you set win over it",
    )
    baseline: bool = Field(True, description="also train the student on labels alone, for comparison")
    combine: Literal["average", "weights", "confidence"] = Field(
        "average", description="how several teachers' predictions are combined"
    )
    teacher_weights: list[float] = Field(default_factory=list, description="per teacher, with combine: weights")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # Whether kd_weight = ce_weight = 0 leaves nothing to learn depends on the strategy: each
    # strategy's `problems()` checks it (kd_ops.distill.strategies), so this schema names no method.


class TrainConfig(_Section):
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = Field(
        "auto", description="Lightning strategy: ddp, ddp_spawn (CPU processes with gloo), fsdp, deepspeed, ..."
    )
    num_nodes: int = Field(1, ge=1, description="machines in a multi-node Lightning run")

    @model_validator(mode="after")
    def _fsdp_needs_a_gpu(self) -> "TrainConfig":
        if self.strategy.startswith("fsdp") and self.accelerator == "cpu":
            raise ValueError(
                f"train.strategy = {self.strategy!r} needs a GPU: Lightning's FSDP refuses train.accelerator = 'cpu'"
                " (use ddp or ddp_spawn on CPU, or set train.accelerator: gpu)"
            )
        return self

    deterministic: bool = True
    progress_bar: bool = True
