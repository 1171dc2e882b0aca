"""One FLOP counter for the trainer's TFLOP/s and MFU, the dry run and ``cluster.plan``, and one
table of peak throughputs.

FLOPs are counted by torch's ``FlopCounterMode`` running one sample's forward and backward
through the stage's model on the meta device (no weights, no data, a second or two even at 5B):
each tower sees its own tokens, frozen weights get no gradient (a frozen tower with nothing
trainable before it, no backward at all), and activation checkpointing's recompute counts,
because it is executed work (hardware FLOPs, not model FLOPs). The count is of the unsharded
model; tensor parallelism splits it over the ranks, a few replicated layers aside.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline.transforms import Batch
from pali3_train.config import Config
from pali3_train.stages.registry import spec_for, stage_model

# Dense bf16 peak per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, None where it is not known (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def sample_batch(cfg: Config) -> Batch:
    """One sample of the config's shapes on the meta device, masks all set."""
    vit, data = cfg.model.vit, cfg.data
    with torch.device("meta"):
        prompt = torch.zeros(1, data.max_prompt_tokens, dtype=torch.long)
        target = torch.zeros(1, data.max_target_tokens, dtype=torch.long)
        return Batch(
            images=torch.zeros(1, 3, vit.image_size_px, vit.image_size_px),
            prompt=prompt,
            prompt_mask=torch.ones_like(prompt, dtype=torch.bool),
            target=target,
            target_mask=torch.ones_like(target, dtype=torch.bool),
            keys=("meta",),
            sources=("meta",),
            worker=0,
            health={},
        )


def count_flops_per_sample(model: nn.Module, cfg: Config) -> float:
    """FLOPs of one sample's forward and backward through ``model`` (on the meta device), with
    whatever freezing and checkpointing it carries."""
    with FlopCounterMode(display=False) as counter:
        loss = spec_for(cfg).planning_loss(model, sample_batch(cfg))
        if loss.requires_grad:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def with_checkpointing(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # megatron-core warns that Apex/TransformerEngine are absent
        warnings.simplefilter("ignore")
        from pali3_train.parallel.checkpointing import apply_activation_checkpointing
    return apply_activation_checkpointing(model)


def flops_per_sample(cfg: Config) -> float:
    """FLOPs of one sample of the run ``cfg`` describes, checkpointing as it says."""
    model = stage_model(cfg)
    if cfg.parallel.activation_checkpointing:
        model = with_checkpointing(model)
    return count_flops_per_sample(model, cfg)
