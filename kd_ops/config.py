"""The experiment config: one YAML file, validated by pydantic.

Every error a user can make in a config is reported as a `ConfigError` that names the file, the
key (dotted path), the value and what is wrong, so the CLI can print one message and exit 2
instead of a traceback. This module imports no heavy library; the checks that need the component
registries (torch models, datasets) live in `kd_ops.components`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem a user can fix; `str()` is the whole message to show them."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's message: enough to say what failed, not a page of internals."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = "digits"
    train_fraction: float = Field(1.0, gt=0, le=1, description="share of the training split used as transfer set")
    exclude_classes: list[int] = Field(default_factory=list, description="classes left out of the transfer set")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    batch_size: int = Field(64, ge=1)


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
    ce_weight: float = Field(0.1, ge=0)
    jitter: float = Field(
        0.0, ge=0, description="std of Gaussian noise (in standardized units) added to transfer inputs each step"
    )
    mixup: float = Field(
        0.0, ge=0, description="mixup Beta(a, a) on transfer inputs each step (0 = off); the teacher labels the blends"
    )
    baseline: bool = Field(True, description="also train the student on labels alone, for comparison")
    combine: Literal["average", "weights", "confidence"] = Field(
        "average", description="how several teachers' predictions are combined"
    )
    teacher_weights: list[float] = Field(default_factory=list, description="per teacher, with combine: weights")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # Whether kd_weight = ce_weight = 0 leaves nothing to learn depends on the strategy: each
    # strategy's `problems()` checks it (kd_ops.strategies), so this schema names no method.


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


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "kd-ops"


class RegistryConfig(_Section):
    name: str = Field("kd-ops-student", min_length=1)
    alias: str = "challenger"
    promote: bool = Field(True, description="make the new version `champion` when every gate passes")

    @model_validator(mode="after")
    def _alias_not_reserved(self) -> "RegistryConfig":
        if self.alias in ("champion", "previous"):
            raise ValueError(
                f"registry.alias = {self.alias!r}: 'champion' and 'previous' are set only by promotion "
                "(gates) and rollback; a new version is registered under another alias, e.g. 'challenger'"
            )
        return self


GATE_PREFIXES = ("min_", "max_")


class WebhookHook(_Section):
    """POST the alert as JSON (or a Slack-compatible body); optionally signed with HMAC-SHA256."""

    type: Literal["webhook"] = "webhook"
    url: str | None = Field(None, description="http(s) URL to POST to")
    url_env: str | None = Field(None, description="environment variable holding the URL (a Slack URL is a secret)")
    format: Literal["json", "slack"] = "json"
    secret_env: str | None = Field(None, description="environment variable holding the HMAC key")
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=10, description="further attempts after a connection error, 429 or 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first wait between attempts; doubles each time")

    @model_validator(mode="after")
    def _one_url(self) -> "WebhookHook":
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url = {self.url!r}: must start with http:// or https://")
        return self


class CommandHook(_Section):
    """Run a command (no shell) with the alert as JSON on stdin."""

    type: Literal["command"] = "command"
    command: list[str] = Field(min_length=1)
    timeout_s: float = Field(30.0, gt=0)


class EntryPointHook(_Section):
    """A hook an installed package registers in the entry-point group `kd_ops.alert_hooks`."""

    type: Literal["entry_point"] = "entry_point"
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


HookConfig = Annotated[WebhookHook | CommandHook | EntryPointHook, Field(discriminator="type")]


class AlertsConfig(_Section):
    hooks: list[HookConfig] = Field(default_factory=list)
    notify_on: Literal["alert", "warn"] = Field("alert", description="lowest status that is sent")
    cooldown_minutes: float = Field(
        60.0, ge=0, description="the same reason for the same model is sent at most once per cooldown"
    )
    state_file: str = Field(".kd-ops/alert-state.json", description="when each (model, reason) was last sent")


class Threshold(_Section):
    """A signal is `warn` past `warn` and `alert` past `alert` (both in the signal's own units)."""

    warn: float
    alert: float

    @model_validator(mode="after")
    def _ordered(self) -> "Threshold":
        if self.alert < self.warn:
            raise ValueError(f"alert ({self.alert}) must be at least warn ({self.warn})")
        return self


def _threshold(warn: float, alert: float, what: str) -> Any:
    return Field(default_factory=lambda: Threshold(warn=warn, alert=alert), description=what)


class MonitorThresholds(_Section):
    drift_share: Threshold = _threshold(0.3, 0.5, "share of input features whose distribution drifted")
    # PSI's usual bands: under 0.1 no change, 0.1-0.2 moderate, over 0.2 significant
    prediction_drift: Threshold = _threshold(0.1, 0.2, "PSI of the predicted class against the reference")
    confidence_drift: Threshold = _threshold(0.99, 0.999, "1 - p-value of the confidence drift test")
    slice_drift: Threshold = _threshold(0.1, 0.2, "PSI of the share of traffic per input slice, worst slice")
    accuracy_drop: Threshold = _threshold(0.03, 0.06, "reference accuracy minus accuracy on labelled rows")
    slice_accuracy_drop: Threshold = _threshold(0.06, 0.12, "the same, worst slice")
    estimated_accuracy_drop: Threshold = _threshold(0.03, 0.06, "reference accuracy minus the label-free estimate")
    agreement_drop: Threshold = _threshold(0.03, 0.06, "reference agreement with the teacher minus the window's")


class MonitorConfig(_Section):
    store: str = Field("sqlite:///predictions.db", description="the prediction log (a SQLAlchemy URL)")
    window_rows: int | None = Field(1000, ge=1, description="judge the latest N predictions of the served version")
    window_minutes: float | None = Field(None, gt=0, description="or: the predictions of the last M minutes")
    min_rows: int = Field(200, ge=1, description="fewer rows in the window: status 'insufficient', no verdict")
    min_labelled_rows: int = Field(100, ge=1, description="fewer labelled rows: accuracy is not judged")
    min_slice_rows: int = Field(30, ge=1, description="fewer rows in a slice: that slice is not judged")
    drift_p_value: float = Field(0.05, gt=0, lt=1, description="per-feature drift test level")
    rate_p_value: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="a drop in accuracy or agreement counts only below this one-sided p-value (about 3 sigma)",
    )
    thresholds: MonitorThresholds = Field(default_factory=MonitorThresholds)
    workspace: str | None = Field(".kd-ops/evidently", description="Evidently workspace for the report history")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    # When `kd-ops deploy` runs the monitor: a cron string, or every `interval_minutes`
    cron: str | None = Field(None, description="monitor deployment schedule (cron, e.g. '*/15 * * * *')")
    interval_minutes: float | None = Field(10, gt=0, description="or: run the monitor every M minutes")

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str | None) -> str | None:
        return check_cron(v)


def check_cron(v: str | None) -> str | None:
    """Five fields; Prefect checks the rest when `kd-ops deploy` builds the schedule (importing it
    here would slow every command by a second)."""
    if v is not None and len(v.split()) != 5:
        raise ValueError(f"{v!r} is not a cron string of five fields (minute hour day month weekday)")
    return v


class RedistillConfig(_Section):
    """Re-distillation after drift: the transfer set is the training data plus recent production
    inputs labelled by the teacher (feedback labels win where they exist); the new student must
    beat the champion on recent rows it did not train on and hold its accuracy on the reference."""

    production_rows: int = Field(2000, ge=10, description="the latest N logged predictions of the model")
    holdout_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of those rows kept out of training to gate on (recent data)"
    )
    min_recent_gain: float = Field(
        0.0, description="new student's accuracy minus the champion's on the recent holdout must be at least this"
    )
    max_reference_drop: float = Field(
        0.02, ge=0, description="champion's accuracy minus the new student's on the reference, at most this"
    )
    cron: str | None = Field("0 3 * * 0", description="scheduled re-distillation (weekly by default); null: none")
    on_alert: bool = Field(True, description="start a re-distillation when the monitor raises an alert")
    cooldown_minutes: float = Field(60, ge=0, description="alerts within this time after one start nothing more")

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str | None) -> str | None:
        return check_cron(v)


def check_gate_keys(gates: dict[str, float]) -> dict[str, float]:
    """Gate keys are `min_<metric>` or `max_<metric>`; whether the metric exists is checked in
    `kd_ops.components` (it needs the evaluation module)."""
    for key in gates:
        if not key.startswith(GATE_PREFIXES) or len(key) <= 4:
            raise ValueError(f"gates.{key}: a gate is min_<metric> or max_<metric>, e.g. min_accuracy_retention: 0.95")
    return gates


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


# ---------------------------------------------------------------------------------------------
# Loading


MAX_CONFIG_BYTES = 1 << 20  # an experiment file is a page of YAML; a bigger one is a mistake or an attack
MAX_CONFIG_VALUES = 100_000  # scalars, lists and mappings after YAML aliases are expanded
MAX_ERROR_LINES = 20

# Bounded at every level, so showing a value costs the same however large it is (an expanded
# alias bomb shares one list a billion times over; a plain repr() would walk every copy).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 50


def _format_value(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expanded_size(root: yaml.Node, limit: int) -> tuple[int, int]:
    """How many values `root` stands for once aliases are expanded (counting up to `limit`), and how
    many distinct nodes it has. Aliases reuse one node object, so each distinct node is sized once:
    linear in the document's size."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(c), 0) for c in children))
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes.get(id(root), 0), len(sizes)


def safe_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, with the expansion of aliases bounded: a few hundred bytes of nested
    anchors (`&a [*b, *b, ...]`) stand for billions of values, and everything that walks the
    result (validation, error messages, MLflow params) would take minutes and gigabytes."""
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded, distinct = _expanded_size(node, MAX_CONFIG_VALUES)
        if distinct > MAX_CONFIG_VALUES:
            raise ConfigError(f"{source}: holds more than {MAX_CONFIG_VALUES:,} values; an experiment config needs far fewer")
        if expanded > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_CONFIG_VALUES:,} values through YAML aliases (*name); "
                "an experiment config needs far fewer (is it an alias bomb?)"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be an experiment config") from None
    finally:
        loader.dispose()


def _error_lines(err: ValidationError, set_keys: set[str]) -> list[str]:
    lines = []
    errors = err.errors()
    if len(errors) > MAX_ERROR_LINES:
        # One screen of problems is enough to act on; the count says how many more there are.
        rest = len(errors) - MAX_ERROR_LINES
        errors = errors[:MAX_ERROR_LINES]
    else:
        rest = 0
    for e in errors:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        origin = " (from --set)" if loc in set_keys else ""
        if not e["loc"]:  # a check across keys: its message names them
            lines.append(msg)
            continue
        lines.append(f"{loc} = {_format_value(value)}{origin}: {msg}")
    if rest:
        lines.append(f"... and {rest} more problems")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 0.5 is a float, [1,2] a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set distill.temperature=2")
    try:
        value = safe_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> tuple[dict[str, Any], set[str]]:
    data = copy.deepcopy(raw)
    keys: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(path[: i + 1])
                raise ConfigError(f"{source}: --set {text!r}: {prefix} is {child!r}, not a section")
            node = child
        node[path[-1]] = value
        keys.add(".".join(path))
    return data, keys


def config_from_dict(raw: Any, source: str = "<dict>", set_keys: set[str] | None = None) -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = _error_lines(err, set_keys or set())
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None
    from kd_ops.components import check_components  # imports the registries (torch)

    check_components(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate one experiment file; raises ConfigError for anything wrong."""
    path = Path(path)
    source = str(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config {source} is {path.stat().st_size:,} bytes, over the limit of {MAX_CONFIG_BYTES:,}: "
                "an experiment config is a page of YAML"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:  # a pipe or device that reported no size
        raise ConfigError(f"config {source} is over the limit of {MAX_CONFIG_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config {source} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
            f"(offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        raw = safe_yaml(text, source)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw, set_keys = apply_overrides(raw or {}, overrides or [], source)
    return config_from_dict(raw, source, set_keys)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
