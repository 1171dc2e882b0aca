"""Typed configuration: YAML files in configs/ validated into frozen dataclasses."""

from pali3_train.config.loader import (
    ConfigError,
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
    ModelConfig,
    ParallelConfig,
    SourceConfig,
    StageConfig,
    TextConfig,
    TrackingConfig,
    TrainConfig,
    UL2Config,
    ViTConfig,
    ZeroShotConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ParallelConfig",
    "SourceConfig",
    "StageConfig",
    "TextConfig",
    "TrackingConfig",
    "TrainConfig",
    "UL2Config",
    "ViTConfig",
    "ZeroShotConfig",
    "config_from_dict",
    "dump_config",
    "load_config",
    "load_config_or_exit",
    "to_dict",
]
