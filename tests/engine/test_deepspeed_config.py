"""The generated DeepSpeed config: batch factorisation, the switches it carries over, and ZeRO's
knobs derived from the model width (against hand-worked values and DeepSpeed's own parser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pali3_train.config import ConfigError, config_from_dict
from pali3_train.engine.deepspeed_config import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------------ ZeRO's knobs

TINY = {"vit": {"width": 64}, "text": {"width": 48}, "ul2": {"d_model": 64}}  # h = 64


def test_zero3_knobs_are_derived_from_the_widest_tower():
    """h = 64 (ViT and UL2; the text tower is narrower): buckets of the floor 2**22 (h*h = 4096
    is below it), prefetch int(0.9 * 4096) = 3686, persistence 10*h = 640, live, reuse and
    sub-group 12*h*h = 49152; DeepSpeed's process-wide linear swap off (the model's linears
    get it, engine/zero3_linear)."""
    zero = deepspeed_config(_cfg(model=TINY, parallel={"zero_stage": 3}), 1)["zero_optimization"]
    assert zero == {
        "stage": 3,
        "reduce_bucket_size": 2**22,
        "allgather_bucket_size": 2**22,
        "contiguous_gradients": True,
        "stage3_prefetch_bucket_size": 3686,
        "stage3_param_persistence_threshold": 640,
        "stage3_max_live_parameters": 49152,
        "stage3_max_reuse_distance": 49152,
        "sub_group_size": 49152,
        "memory_efficient_linear": False,
    }


def test_the_5b_preset_gets_buckets_of_its_ul2_width():
    """PaLI-3 5B: ViT-G width 1664, UL2 d_model 2048 -> h = 2048: 4,194,304-element buckets
    (16 MiB in fp32, against DeepSpeed's 5e8 = 1.9 GiB), prefetch 3,774,873 (0.9 h*h, rounded
    down), persistence 20,480, one layer's 50,331,648 live."""
    from pali3_train.config import load_config

    cfg = load_config(ROOT / "configs/models/pali3_5b.yaml", ["parallel.zero_stage=3"])
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (4194304, 3774873)
    assert zero["stage3_param_persistence_threshold"] == 20480
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 50331648
    assert zero["sub_group_size"] == 50331648


def test_below_zero3_only_the_buckets_are_set_and_an_odd_square_is_rounded_up():
    """A 2049-wide model: h*h = 4,198,401 (above the floor) for the reduce bucket, 4,198,402
    for the all-gather one (even)."""
    model = {"vit": {"width": 2049, "num_heads": 3}, "text": {"width": 63, "num_heads": 3},
             "ul2": {"d_model": 60}}  # fmt: skip
    zero = deepspeed_config(_cfg(model=model, parallel={"zero_stage": 2}), 1)["zero_optimization"]
    assert zero == {
        "stage": 2,
        "reduce_bucket_size": 4198401,
        "allgather_bucket_size": 4198402,
        "contiguous_gradients": True,
    }


def test_values_given_in_the_config_are_taken_as_they_are():
    knobs = {
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 200_000_000,
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 7,
        "sub_group_size": 1_000_000_000,
        "overlap_comm": False,
        "contiguous_gradients": False,
    }
    cfg = _cfg(model=TINY, parallel={"zero_stage": 3, "zero": knobs})
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert {k: zero[k] for k in knobs} == knobs


def test_deepspeed_reads_the_generated_zero_section_as_written():
    """DeepSpeed's own parser (0.19.8) takes every key: none is misspelt into a default."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = _cfg(model=TINY, parallel={"zero_stage": 3, "zero": {"overlap_comm": False}})
    parsed = DeepSpeedZeroConfig(**deepspeed_config(cfg, 1)["zero_optimization"])
    assert (parsed.stage, parsed.reduce_bucket_size, parsed.allgather_bucket_size) == (
        3,
        2**22,
        2**22,
    )
    assert (parsed.prefetch_bucket_size, parsed.param_persistence_threshold) == (3686, 640)
    assert (parsed.max_live_parameters, parsed.max_reuse_distance) == (49152, 49152)
    assert parsed.sub_group_size == 49152
    assert (parsed.overlap_comm, parsed.contiguous_gradients) == (False, True)
    assert parsed.memory_efficient_linear is False


@pytest.mark.parametrize(
    "knobs, field, message",
    [
        ({"reduce_bucket_size": 0}, "reduce_bucket_size", "must be > 0 (or null), got 0"),
        ({"stage3_max_reuse_distance": -1}, "stage3_max_reuse_distance", "must be > 0"),
        ({"sub_group_size": 0}, "sub_group_size", "must be > 0 (or null), got 0"),
        ({"stage3_param_persistence_threshold": -5}, "stage3_param_persistence_threshold",
         "must be >= 0 (or null), got -5"),
        ({"allgather_bucket_size": 1001}, "allgather_bucket_size", "must be even"),
        ({"reduce_bucket_size": "5e8"}, "reduce_bucket_size", "must be an integer, got str"),
        ({"overlap_comm": "yes"}, "overlap_comm", "must be true or false"),
        ({"reduce_bucket": 10}, "reduce_bucket", "did you mean 'reduce_bucket_size'?"),
    ],
)  # fmt: skip
def test_bad_knobs_are_refused_naming_the_field(knobs, field, message):
    with pytest.raises(ConfigError) as info:
        _cfg(parallel={"zero_stage": 3, "zero": knobs})
    assert info.value.field_path == f"parallel.zero.{field}"
    assert message in str(info.value)
