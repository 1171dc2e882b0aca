"""Multi-head attention over ``scaled_dot_product_attention``, shared by every tower.

Self-attention projects q, k and v of its input with one GEMM (``qkv_proj``). Attention whose keys
and values come from elsewhere projects them with one GEMM of their own (``project_kv``), so that
callers can cache them: the decoder appends one step's keys to its self-attention cache and
computes the encoder's cross-attention keys once per generation; the MAP head's probe attends over
the image tokens. The fused weights' layout is ``models/projections.py``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.models.flex_bias import FlexBias
from pali3_train.models.projections import FusedLinear, Projections, project

KV = tuple[torch.Tensor, torch.Tensor]


class MultiHeadAttention(nn.Module):
    """q/k/v/out projections; ``scale=None`` means 1/sqrt(head_dim). T5 folds the scale into its
    initialisation and uses ``scale=1``.

    ``joint_qkv``: ``qkv_proj``, rows [head, {q, k, v}, head_dim]; otherwise ``q_proj`` and
    ``kv_proj``, rows [head, {k, v}, head_dim], for attention whose keys and values are projected
    apart from its queries (``project_kv``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        bias: bool,
        scale: float | None = None,
        joint_qkv: bool = True,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.joint_qkv = joint_qkv
        # "fused": one GEMM per fused weight; "separate": one per projection, the plain reference
        # (``pali3_train.kernels`` sets it)
        self.projections: Projections = "fused"
        if joint_qkv:
            self.qkv_proj = FusedLinear(dim, num_heads, 3, head_dim, bias)
        else:
            self.q_proj = nn.Linear(dim, inner, bias=bias)
            self.kv_proj = FusedLinear(dim, num_heads, 2, head_dim, bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H*hd] -> [B, H, L, hd]
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _project_heads(self, linear: nn.Module, x: torch.Tensor, parts: int) -> tuple:
        # [B, L, D] -> ``parts`` tensors [B, H, L, hd]
        heads = project(linear, x, parts, self.head_dim, self.projections)
        return tuple(h.transpose(1, 2) for h in heads)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> (q, k, v), each [B, H, L, hd]."""
        if self.joint_qkv:
            return self._project_heads(self.qkv_proj, x, 3)
        return (self._split_heads(self.q_proj(x)), *self.project_kv(x))

    def project_kv(self, source: torch.Tensor) -> KV:
        """source [B, Lk, D] -> (k, v), each [B, H, Lk, hd] (a module built with
        ``joint_qkv=False``)."""
        return self._project_heads(self.kv_proj, source, 2)

    def forward(
        self, x: torch.Tensor, kv: KV | None = None, bias: torch.Tensor | FlexBias | None = None
    ) -> torch.Tensor:
        """x [B, Lq, D]; kv from ``project_kv`` (default: self-attention over x);
        bias additive, broadcastable to [B, H, Lq, Lk], or a ``FlexBias`` (FlexAttention's
        score_mod and block mask). Returns [B, Lq, D]."""
        q, k, v = self.project_qkv(x) if kv is None else (self._split_heads(self.q_proj(x)), *kv)
        if isinstance(bias, FlexBias):
            out = bias.attend(q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask [B, Lk] (True = attend) -> additive bias [B, 1, 1, Lk]."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )[:, None, None, :]
