"""Several linear maps of one input stored as one weight, so that they run as one GEMM.

A fused weight's output rows are ordered [group, part, width]: attention's q/k/v as
[head, {q, k, v}, head_dim], a gated feed-forward's gate/up as [hidden unit, {gate, up}] (width 1).
Column-parallel tensor parallelism hands each rank a contiguous chunk of rows, so a chunk of whole
groups holds every part of those groups: the layout is the same at any TP size, which only has to
divide the number of groups (``parallel/tensor_parallel.py`` checks it).

``project`` runs a fused layer the way the ``kernels.projections`` switch says: "fused", one GEMM
through the layer's own forward (which tensor parallelism or ZeRO-3 may have replaced), or
"separate", one GEMM per part over slices of the same weight, the plain reference (an unsharded
layer only: ``pali3_train.kernels`` refuses it under TP and ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Projections = Literal["fused", "separate"]


class FusedLinear(nn.Linear):
    """``parts`` maps in_features -> groups x width, as one layer of groups x parts x width
    output features ordered [group, part, width]."""

    def __init__(self, in_features: int, groups: int, parts: int, width: int, bias: bool):
        super().__init__(in_features, groups * parts * width, bias=bias)
        self.parts, self.width = parts, width

    @property
    def part_features(self) -> int:
        """Output features of each map (what its initialisation's fan-out counts)."""
        return self.out_features // self.parts


def project(
    linear: nn.Module, x: torch.Tensor, parts: int, width: int, mode: Projections
) -> tuple[torch.Tensor, ...]:
    """x [..., in] through a fused layer -> ``parts`` tensors [..., groups, width] (views of one
    output when fused). ``parts`` and ``width`` are passed in, as tensor parallelism swaps the
    layer for one that does not carry them."""
    if mode == "fused":
        return linear(x).unflatten(-1, (-1, parts, width)).unbind(-2)
    weights = split(linear.weight, parts, width)
    biases = [None] * parts if linear.bias is None else split(linear.bias, parts, width)
    return tuple(F.linear(x, w, b).unflatten(-1, (-1, width)) for w, b in zip(weights, biases))


def split(fused: torch.Tensor, parts: int, width: int) -> list[torch.Tensor]:
    """A fused weight [groups x parts x width, ...] (or its bias) -> each part's
    [groups x width, ...], in part order."""
    return [p.flatten(0, 1) for p in fused.unflatten(0, (-1, parts, width)).unbind(1)]


def fuse(parts: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Separate weights (or biases) [groups x width, ...] of each part -> the fused one (the
    inverse of ``split``)."""
    return torch.stack([p.unflatten(0, (-1, width)) for p in parts], dim=1).flatten(0, 2)


def normal_parts_(weight: torch.Tensor, stds: Sequence[float], width: int) -> torch.Tensor:
    """Fill a fused weight with part i drawn from N(0, stds[i]^2) (T5 draws its queries at a
    smaller scale than keys and values). Call it as ``projections.normal_parts_``: ZeRO-3's
    partitioned construction redirects it as it does ``torch.nn.init`` (``engine/zero_init.py``),
    since it writes through a view of the weight."""
    with torch.no_grad():
        nn.init.normal_(weight)
        scale = torch.tensor(stds, dtype=weight.dtype, device=weight.device)
        weight.unflatten(0, (-1, len(stds), width)).mul_(scale[:, None, None])
    return weight
