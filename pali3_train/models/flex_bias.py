"""UL2's attention biases for FlexAttention: the relative-position bias as a ``score_mod``, padding
and causality as a ``BlockMask``.

On the SDPA path every layer adds a dense bias of [B or 1, H, Lq, Lk] to its scores, and its
backward pass produces that bias's gradient at the same size in every layer before it is summed
into the [buckets, heads] table (at 812 px the encoder reads ~3.4k tokens: a 3.4k x 3.4k x H
tensor per layer). Here nothing of size Lq x Lk exists outside the kernel: ``score_mod`` reads
the bias of the score's (head, key - query offset) from a [Lq + Lk - 1, H] table, the gradient
flows back into that table (atomically on CUDA), and blocks that are all padding or all future
are skipped rather than masked.

FlexAttention runs compiled on CUDA (eager it materialises the scores). Its CPU forward matches
SDPA, but it has no CPU backward: ``pali3_train.kernels`` refuses ``flex`` for CPU training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)

ScoreMod = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def relative_score_mod(per_offset: torch.Tensor, q_len: int) -> ScoreMod:
    """per_offset [q_len + k_len - 1, H]: the bias of key - query offset o at row o + q_len - 1
    (``RelativePositionBias.per_offset``) -> a score_mod adding it to every score."""

    def add_relative_bias(score, b, h, q_idx, kv_idx):
        return score + per_offset[kv_idx - q_idx + (q_len - 1), h].to(score.dtype)

    return add_relative_bias


def key_padding(mask: torch.Tensor) -> MaskMod:
    """mask [B, Lk], True on real keys -> a mask_mod keeping real keys only."""

    def real_key(b, h, q_idx, kv_idx):
        return mask[b, kv_idx]

    return real_key


def causal(b, h, q_idx, kv_idx):
    """Each query sees itself and the past."""
    return kv_idx <= q_idx


@dataclass(frozen=True)
class FlexBias:
    """What a layer's FlexAttention call adds to and masks out of its scores."""

    score_mod: ScoreMod | None
    block_mask: BlockMask | None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None):
        """q [B, H, Lq, hd], k and v [B, H, Lk, hd] -> [B, H, Lq, hd]."""
        attention = _compiled_flex_attention() if q.is_cuda else flex_attention
        return attention(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask, scale=scale)


def block_mask(mask_mod: MaskMod, batch: int | None, q_len: int, k_len: int, device) -> BlockMask:
    """The block-sparse form of ``mask_mod`` (the same for every head). On CUDA it is built by a
    compiled kernel, which never holds the dense [B, Lq, Lk] mask."""
    device = torch.device(device)
    return create_block_mask(
        mask_mod, batch, None, q_len, k_len, device=device, _compile=device.type == "cuda"
    )


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)
