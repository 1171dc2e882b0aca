"""Multi-head attention over ``scaled_dot_product_attention``, shared by every tower.

Keys and values are computed by ``project_kv`` separately from the attention itself, so that callers
can cache them: the decoder appends one step's keys to its self-attention cache and computes the
encoder's cross-attention keys once per generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


class MultiHeadAttention(nn.Module):
    """q/k/v/out projections; ``scale=None`` means 1/sqrt(head_dim). T5 folds the scale into its
    initialisation and uses ``scale=1``."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, bias: bool, scale: float | None = None
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H*hd] -> [B, H, L, hd]
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def project_kv(self, source: torch.Tensor) -> KV:
        """source [B, Lk, D] -> (k, v), each [B, H, Lk, hd]."""
        return self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source))

    def forward(
        self, x: torch.Tensor, kv: KV | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, Lq, D]; kv from ``project_kv`` (default: self-attention over x);
        bias additive, broadcastable to [B, H, Lq, Lk]. Returns [B, Lq, D]."""
        k, v = self.project_kv(x) if kv is None else kv
        q = self._split_heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask [B, Lk] (True = attend) -> additive bias [B, 1, 1, Lk]."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )[:, None, None, :]
