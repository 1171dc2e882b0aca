"""Which kernel runs each hot spot of the training step, decided in one place.

``KernelsConfig`` (the YAML's ``kernels:`` section) says what the user asked for, with "auto" for
"the fast path where this platform has one". ``resolve_kernels`` turns it into concrete choices
for a device and a parallel layout, refusing combinations that cannot run there, and
``apply_kernels`` sets them on a built model from outside, as tensor parallelism and activation
checkpointing are applied: the models default to the plain PyTorch path, which stays the
reference every fast path is tested against.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from pali3_train.config.schema import KernelsConfig, ParallelConfig


@dataclass(frozen=True)
class Kernels:
    """Resolved choices: no "auto" left."""

    compile: bool
    projections: str  # "fused" | "separate"
    attention: str  # "flex" | "sdpa"
    cross_entropy: str  # "liger" | "chunked" | "plain"
    cross_entropy_chunk_tokens: int
    ring_loss: str  # "fused" | "plain"


PLAIN = Kernels(False, "separate", "sdpa", "plain", 1024, "plain")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(
    cfg: KernelsConfig, device: torch.device, parallel: ParallelConfig, training: bool = True
) -> Kernels:
    """Concrete choices for ``device`` (raises ``ValueError`` naming the field for a choice that
    cannot run there)."""
    cuda = device.type == "cuda"
    if cfg.attention == "flex" and training and not cuda:
        raise ValueError(
            "kernels.attention: flex needs CUDA to train (FlexAttention has no backward on "
            f"{device.type}); use sdpa or auto"
        )
    liger_fits = cuda and parallel.tensor_parallel_size == 1 and parallel.zero_stage < 3
    if cfg.cross_entropy == "liger" and not liger_available():
        raise ValueError("kernels.cross_entropy: liger needs liger-kernel installed")
    if cfg.cross_entropy == "auto":
        cross_entropy = "liger" if liger_fits and liger_available() else "chunked"
    else:
        cross_entropy = cfg.cross_entropy
    return Kernels(
        compile=cfg.compile == "on" or (cfg.compile == "auto" and cuda),
        projections=cfg.projections,
        attention=("flex" if cuda else "sdpa") if cfg.attention == "auto" else cfg.attention,
        cross_entropy=cross_entropy,
        cross_entropy_chunk_tokens=cfg.cross_entropy_chunk_tokens,
        ring_loss=cfg.ring_loss,
    )


def apply_kernels(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Set ``kernels`` on ``model`` in place (after tensor parallelism and activation
    checkpointing) and return it."""
    return model
