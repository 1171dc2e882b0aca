"""The generated DeepSpeed config: batch factorisation and the switches it carries over."""

from __future__ import annotations

import pytest

from pali3_train.config import ConfigError, config_from_dict
from pali3_train.engine.deepspeed_config import deepspeed_config


def _cfg(**sections):
    return config_from_dict(sections)


def test_accumulation_is_derived_from_global_micro_and_data_parallel_size():
    cfg = _cfg(train={"global_batch_size": 64, "micro_batch_size": 4}, parallel={"zero_stage": 3})
    ds = deepspeed_config(cfg, dp_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (64, 4)
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": False}
    assert ds["gradient_clipping"] == cfg.train.grad_clip_norm


def test_bf16_is_carried_over():
    assert deepspeed_config(_cfg(train={"precision": "bf16"}), 1)["bf16"] == {"enabled": True}


def test_a_global_batch_that_does_not_factorise_is_refused_naming_the_field():
    cfg = _cfg(train={"global_batch_size": 24, "micro_batch_size": 4})
    with pytest.raises(ConfigError) as info:
        deepspeed_config(cfg, dp_size=4)
    assert info.value.field_path == "train.global_batch_size"
    assert "data-parallel size=4" in str(info.value)
