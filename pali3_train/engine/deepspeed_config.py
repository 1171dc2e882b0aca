"""The DeepSpeed JSON, generated from our config so that no setting is written twice.

Batch sizes: ``global = micro x accumulation x data-parallel size``; the accumulation is derived,
and a global batch that does not factorise is refused before any process group exists.

ZeRO: every knob of ``parallel.zero`` is written out, a null one derived from the model's width
h by the rule ``ZeroConfig`` documents, so the JSON says what DeepSpeed will do instead of
leaving it to defaults sized for far wider models (DeepSpeed 0.19.8: 5e8-element buckets, a 5e7
prefetch, 1e9 live parameters, reuse distance and sub-group, a persistence threshold of 1e5).
"""

from __future__ import annotations

from pali3_train.config import Config, ConfigError
from pali3_train.precision import deepspeed_section


def accumulation_steps(cfg: Config, dp_size: int, where: str = "config") -> int:
    micro, total = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if total % (micro * dp_size):
        raise ConfigError(
            where,
            "train.global_batch_size",
            f"{total} is not micro_batch_size={micro} x accumulation x data-parallel size="
            f"{dp_size} for any whole accumulation",
            also=("train.micro_batch_size", "parallel.tensor_parallel_size"),
        )
    return total // (micro * dp_size)


def model_width(cfg: Config) -> int:
    """h: the widest tower's hidden size, the one DeepSpeed's "auto" rules scale with."""
    model = cfg.model
    return max(model.vit.width, model.text.width, model.ul2.d_model)


# The smallest gradient bucket (elements; 16 MiB in fp32). Each bucket is one collective, whose
# fixed cost (~1 ms over gloo, tens of microseconds over NCCL) h*h elements amortise only on wide
# models: at h = 64, 4096-element buckets made the tiny recipes' ZeRO-2 steps 2.4x slower
# (stage 0 on 2 CPU ranks, median step 0.246 s against 0.103 s with this floor).
MIN_BUCKET = 2**22


def zero_section(cfg: Config) -> dict:
    """DeepSpeed's ``zero_optimization``: the stage and ``parallel.zero``'s knobs, null ones
    derived from the model width (the stage3_* ones under ZeRO-3 only)."""
    stage, knobs, h = cfg.parallel.zero_stage, cfg.parallel.zero, model_width(cfg)
    bucket = max(h * h, MIN_BUCKET)
    rules: dict = {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket + bucket % 2,
        "contiguous_gradients": True,
        "overlap_comm": None,  # left to DeepSpeed: on for ZeRO-3 only
    }
    if stage == 3:
        layer = 12 * h * h  # a transformer layer of width h: 4h*h attention, 8h*h feed-forward
        rules |= {
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h,
            "stage3_max_live_parameters": layer,
            "stage3_max_reuse_distance": layer,
            "sub_group_size": layer,
        }
    zero: dict = {"stage": stage}
    for name, rule in rules.items():
        value = rule if getattr(knobs, name) is None else getattr(knobs, name)
        if value is not None:
            zero[name] = value
    if stage == 3:
        # Read by zero.Init (engine/zero_init.py), which would otherwise swap
        # torch.nn.functional.linear for its own, process-wide and for good; the model's own
        # linears get it instead (parallel.zero.memory_efficient_linear, engine/zero3_linear.py).
        zero["memory_efficient_linear"] = False
    return zero


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, dp_size),
        "gradient_clipping": cfg.train.grad_clip_norm,
        "zero_optimization": zero_section(cfg),
        "steps_per_print": 2**31 - 1,  # our own logging reports progress
        "wall_clock_breakdown": False,
    } | deepspeed_section(cfg.train.precision)
