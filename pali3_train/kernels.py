"""Which kernel runs each hot spot of the training step, decided in one place.

``KernelsConfig`` (the YAML's ``kernels:`` section) says what the user asked for, with "auto" for
"the fast path where this platform has one". ``resolve_kernels`` turns it into concrete choices
for a device and a parallel layout, refusing combinations that cannot run there, and
``apply_kernels`` sets them on a built model from outside, as tensor parallelism and activation
checkpointing are applied: the models default to the plain PyTorch path, which stays the
reference every fast path is tested against.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pali3_train.config.schema import FieldError, KernelsConfig, ParallelConfig
from pali3_train.losses.fused_linear import FusedLinearCrossEntropy
from pali3_train.losses.text import TokenLoss, per_token_cross_entropy
from pali3_train.models.attention import MultiHeadAttention
from pali3_train.models.pali3 import PaLI3
from pali3_train.models.siglip import SigLIP
from pali3_train.models.ul2 import UL2, FeedForward


@dataclass(frozen=True)
class Kernels:
    """Resolved choices: no "auto" left."""

    compile: bool
    projections: str  # "fused" | "separate"
    attention: str  # "flex" | "sdpa"
    cross_entropy: str  # "liger" | "fused" | "chunked" | "plain"
    cross_entropy_chunk_tokens: int
    ring_loss: str  # "fused" | "plain"


PLAIN = Kernels(False, "separate", "sdpa", "plain", 1024, "plain")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(
    cfg: KernelsConfig, device: torch.device, parallel: ParallelConfig, training: bool = True
) -> Kernels:
    """Concrete choices for ``device`` (raises ``FieldError`` naming the field for a choice that
    cannot run there)."""
    cuda = device.type == "cuda"
    if cfg.attention == "flex" and training and not cuda:
        raise FieldError(
            "kernels.attention",
            "flex needs CUDA to train (FlexAttention has no backward on "
            f"{device.type}); use sdpa or auto",
        )
    sharded = parallel.tensor_parallel_size > 1 or parallel.zero_stage == 3
    if cfg.projections == "separate" and sharded:
        raise FieldError(
            "kernels.projections",
            "separate slices the weights outside their layers' forward, "
            "which tensor parallelism and ZeRO-3 do not see; use fused",
        )
    whole_head = parallel.tensor_parallel_size == 1 and parallel.zero_stage < 3
    if cfg.cross_entropy in ("liger", "fused") and not whole_head:
        raise FieldError(
            "kernels.cross_entropy",
            f"{cfg.cross_entropy} reads the whole LM head weight, which tensor parallelism "
            "splits and ZeRO-3 gathers only inside the head's forward; use chunked or auto",
        )
    if cfg.cross_entropy == "liger":
        _check_liger(device)
    cross_entropy = cfg.cross_entropy
    if cross_entropy == "auto":
        fused = "liger" if cuda and liger_available() else "fused"
        cross_entropy = fused if whole_head else "chunked"
    return Kernels(
        compile=cfg.compile == "on" or (cfg.compile == "auto" and cuda),
        projections=cfg.projections,
        attention=("flex" if cuda else "sdpa") if cfg.attention == "auto" else cfg.attention,
        cross_entropy=cross_entropy,
        cross_entropy_chunk_tokens=cfg.cross_entropy_chunk_tokens,
        ring_loss=cfg.ring_loss,
    )


def _check_liger(device: torch.device) -> None:
    """Refuse liger where its kernels cannot run (see ``losses.liger``)."""
    if not liger_available():
        raise FieldError("kernels.cross_entropy", "liger needs liger-kernel installed")
    interpreted = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
    if device.type != "cuda" and not interpreted:
        raise FieldError(
            "kernels.cross_entropy",
            f"liger's Triton kernels need CUDA (on {device.type} only Triton's interpreter, "
            "TRITON_INTERPRET=1, runs them: for tests); use fused or auto",
        )


def apply_kernels(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Set ``kernels`` on ``model`` in place (after tensor parallelism and activation
    checkpointing) and return it."""
    for module in model.modules():
        if isinstance(module, UL2):
            module.attention = kernels.attention
        if isinstance(module, (MultiHeadAttention, FeedForward)):
            module.projections = kernels.projections
        if isinstance(module, PaLI3):
            module.token_loss = _token_loss(kernels, module.token_loss)
        if isinstance(module, SigLIP):
            module.ring_loss = kernels.ring_loss
    if kernels.compile:
        # Imported only when chosen: pali3_train.parallel loads megatron-core, which the
        # planning paths (engine.memory, cluster.plan) that import this module do without.
        from pali3_train.parallel.compile import compile_blocks

        compile_blocks(model)
    return model


def _token_loss(kernels: Kernels, current: TokenLoss) -> Callable:
    """PaLI-3's token loss on the chosen path; ``current`` is the plain one, whose per-token
    cross-entropy tensor parallelism may have made vocabulary-parallel."""
    if kernels.cross_entropy == "chunked":
        return dataclasses.replace(current, chunk_tokens=kernels.cross_entropy_chunk_tokens)
    if (
        kernels.cross_entropy in ("fused", "liger")
        and current.per_token is not per_token_cross_entropy
    ):
        raise ValueError(
            f"kernels.cross_entropy: {kernels.cross_entropy} needs the whole vocabulary on one rank"
        )
    if kernels.cross_entropy == "fused":
        return FusedLinearCrossEntropy(kernels.cross_entropy_chunk_tokens)
    if kernels.cross_entropy == "liger":
        # Imported only when chosen: liger loads triton, which reads TRITON_INTERPRET at import.
        from pali3_train.losses.liger import liger_token_loss

        return liger_token_loss
    return current
