"""The pre-LayerNorm transformer encoder block shared by SigLIP's image and text towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.models.attention import MultiHeadAttention
from pali3_train.models.fused import LayerNorm


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
    big_vision initialises its ViT."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(sub.weight.view(sub.weight.shape[0], -1))
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
