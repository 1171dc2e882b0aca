"""Typed configuration: YAML files in configs/ validated into frozen dataclasses (and flattened
into MLflow params by ``flatten_config``)."""

from pali3_train.config.flatten import flatten_config
from pali3_train.config.loader import (
    ConfigError,
    add_overrides_option,
    config_from_dict,
    dump_config,
    load_config,
    load_config_or_exit,
    to_dict,
)
from pali3_train.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    KernelsConfig,
    ModelConfig,
    ParallelConfig,
    SourceConfig,
    StageConfig,
    TextConfig,
    TrackingConfig,
    TrainConfig,
    UL2Config,
    ViTConfig,
    ZeroConfig,
    ZeroShotConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "KernelsConfig",
    "ModelConfig",
    "ParallelConfig",
    "SourceConfig",
    "StageConfig",
    "TextConfig",
    "TrackingConfig",
    "TrainConfig",
    "UL2Config",
    "ViTConfig",
    "ZeroConfig",
    "ZeroShotConfig",
    "add_overrides_option",
    "config_from_dict",
    "dump_config",
    "flatten_config",
    "load_config",
    "load_config_or_exit",
    "to_dict",
]
