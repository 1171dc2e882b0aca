"""Building what a rank trains: the stage's model (same seed on every rank; under ZeRO-3 built
already partitioned over the data-parallel ranks, ``zero_init``), its ``init_from`` weights and
frozen parts, then tensor parallelism, activation checkpointing and the kernels (``kernels:``,
compiled blocks included) applied from outside, and DeepSpeed around the result."""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from pali3_train.config import Config
from pali3_train.engine.deepspeed_config import deepspeed_config
from pali3_train.engine.durable_files import use_durable_files
from pali3_train.engine.host_memory import map_large_allocations
from pali3_train.engine.init_from import load_init_weights
from pali3_train.engine.optim import freeze, make_optimizer, make_scheduler
from pali3_train.engine.zero3_linear import use_memory_efficient_linears
from pali3_train.engine.zero_init import construction
from pali3_train.kernels import apply_kernels, resolve_kernels
from pali3_train.parallel import (
    DeepSpeedMPU,
    ParallelDims,
    apply_activation_checkpointing,
    parallelize,
)
from pali3_train.stages.registry import spec_for


def build_model(cfg: Config, dims: ParallelDims) -> nn.Module:
    """Collective under ZeRO-3 with partitioned construction (every data-parallel rank calls).
    ZeRO-3 on a CPU host also fixes glibc's mmap threshold for the process (``host_memory``)."""
    if cfg.parallel.zero_stage == 3 and get_accelerator().device_name() == "cpu":
        map_large_allocations()
    torch.manual_seed(cfg.train.seed)
    with construction(cfg, dims):
        model = spec_for(cfg).build_model(cfg.model)
    if cfg.stage.init_from:
        load_init_weights(model, spec_for(cfg), cfg.stage)
    freeze(model, cfg.stage.freeze)
    model = parallelize(model, dims)
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero.memory_efficient_linear:
        use_memory_efficient_linears(model)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    device = torch.device(get_accelerator().device_name())
    return apply_kernels(model, resolve_kernels(cfg.kernels, device, cfg.parallel))


def make_engine(cfg: Config, model: nn.Module, dims: ParallelDims, extra: dict | None = None):
    """DeepSpeed around ``model``: AdamW over its trainable parameters, the schedule, ZeRO over
    the data-parallel group only (the mpu adapter), the JSON generated from ``cfg``."""
    optimizer = make_optimizer(model, cfg.train)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, cfg.train),
        config=deepspeed_config(cfg, dims.dp) | (extra or {}),
        mpu=DeepSpeedMPU(),
        dist_init_required=False,
    )
    use_durable_files(engine)
    return engine
