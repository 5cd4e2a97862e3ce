"""The experiment config: one YAML file, validated by pydantic, one module per section.

`loading` reads, overrides (`--set`) and validates a file; an unknown key or a bad value is a
`ConfigError` naming the file and the key. The section modules import no component: the check that
names exist in the registries lives in `kd_ops.catalog`. Everything is re-exported here for users.
"""

from kd_ops.config.base import GATE_PREFIXES, check_cron, check_gate_keys
from kd_ops.config.evaluation import EvaluationConfig
from kd_ops.config.experiment import ExperimentConfig
from kd_ops.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_VALUES,
    MAX_ERROR_LINES,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    safe_yaml,
)
from kd_ops.config.loop import RedistillConfig
from kd_ops.config.monitoring import (
    AlertsConfig,
    CommandHook,
    EntryPointHook,
    HookConfig,
    MonitorConfig,
    MonitorThresholds,
    Threshold,
    WebhookHook,
)
from kd_ops.config.tracking import RegistryConfig, TrackingConfig
from kd_ops.config.training import (
    CacheConfig,
    DataConfig,
    DistillConfig,
    LossSpec,
    ModelSection,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kd_ops.core.errors import ConfigError, first_line

__all__ = [
    "GATE_PREFIXES",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_VALUES",
    "MAX_ERROR_LINES",
    "AlertsConfig",
    "CacheConfig",
    "CommandHook",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EntryPointHook",
    "EvaluationConfig",
    "ExperimentConfig",
    "HookConfig",
    "LossSpec",
    "ModelSection",
    "MonitorConfig",
    "MonitorThresholds",
    "RedistillConfig",
    "RegistryConfig",
    "StudentConfig",
    "TeacherConfig",
    "Threshold",
    "TrackingConfig",
    "TrainConfig",
    "WebhookHook",
    "apply_overrides",
    "check_cron",
    "check_gate_keys",
    "config_from_dict",
    "dump_config",
    "first_line",
    "load_config",
    "parse_override",
    "safe_yaml",
]
