"""The DeepSpeed JSON, generated from our config so that no setting is written twice.

Batch sizes: ``global = micro x accumulation x data-parallel size``; the accumulation is derived,
and a global batch that does not factorise is refused before any process group exists.
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
        )
    return total // (micro * dp_size)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    zero: dict = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        # Gather parameters on demand only; small ones stay resident (cheap, fewer collectives).
        zero |= {"stage3_param_persistence_threshold": 1e4, "contiguous_gradients": True}
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg, dp_size),
        "gradient_clipping": cfg.train.grad_clip_norm,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # our own logging reports progress
        "wall_clock_breakdown": False,
    } | deepspeed_section(cfg.train.precision, cfg.parallel.zero_stage)
