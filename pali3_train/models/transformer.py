"""The pre-LayerNorm transformer encoder block shared by SigLIP's image and text towers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.models.attention import MultiHeadAttention
from pali3_train.models.fused import LayerNorm
from pali3_train.models.projections import FusedLinear


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """x + attn(LN(x)), then + mlp(LN(x)). Shapes: [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = MultiHeadAttention(dim, num_heads, dim // num_heads, bias=True)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """A stack of ``EncoderBlock`` followed by a final LayerNorm."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, num_heads, mlp_dim, eps) for _ in range(depth)
        )
        self.norm = LayerNorm(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear/Conv2d below ``module``, as
    big_vision initialises its ViT: a convolution's kernel counts as the [out, in x kh x kw]
    matrix it flattens to, a fused projection's fan-out is that of one of its parts (q, k and v
    are initialised as the separate matrices they stand for). The fans come from the layer's
    sizes and the weight is filled through ``nn.init`` itself, never through a view: a weight
    partitioned by ZeRO-3 has no shape of its own to read (``engine/zero_init.py``)."""
    for sub in module.modules():
        if isinstance(sub, FusedLinear):
            _xavier_uniform_(sub.weight, sub.in_features, sub.part_features)
        elif isinstance(sub, nn.Linear):
            _xavier_uniform_(sub.weight, sub.in_features, sub.out_features)
        elif isinstance(sub, nn.Conv2d):
            fan_in = sub.in_channels // sub.groups * math.prod(sub.kernel_size)
            _xavier_uniform_(sub.weight, fan_in, sub.out_channels)
        else:
            continue
        if sub.bias is not None:
            nn.init.zeros_(sub.bias)


def _xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    # torch's xavier_uniform_ (gain 1), with the fans given rather than read off the tensor
    bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)
