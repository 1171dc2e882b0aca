"""Token cross-entropy over target tokens only: padding contributes neither loss nor count.

The model hands the loss its final decoder hidden states and its LM head, not logits, so that the
loss decides how many logits exist at once. ``TokenLoss()`` computes them all (the reference);
``TokenLoss(chunk_tokens=n)`` n tokens at a time, each chunk's head GEMM and cross-entropy under
non-reentrant activation checkpointing: a chunk's [n, vocab] logits are freed as soon as its loss
is summed, and the backward pass recomputes them one chunk at a time, so the peak holds one
chunk's logits instead of all of them. ``per_token`` turns a chunk of logits into per-token
losses: over the whole vocabulary here, over this rank's vocabulary shard under tensor
parallelism (``pali3_train.parallel`` swaps it in). ``losses.liger`` is the third way, a fused
kernel. Every way computes the cross-entropy in fp32 (``pali3_train.precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pali3_train.precision import at_least_fp32, upcast

# (logits [N, vocab or vocab shard], targets [N] global ids) -> per-token losses [N], fp32
PerTokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (any float dtype; computed in fp32), targets [N] -> losses [N]."""
    return F.cross_entropy(upcast(logits), targets, reduction="none")


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over real target tokens. logits [B, T, V] (any float dtype; computed in fp32),
    targets [B, T] token ids, mask [B, T] True on real tokens -> scalar."""
    per_token = per_token_cross_entropy(logits.flatten(0, 1), targets.flatten())
    weights = mask.flatten().to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass(frozen=True)
class TokenLoss:
    """The mean cross-entropy over real target tokens, from hidden states and the LM head.

    ``chunk_tokens=None``: all logits at once. Otherwise chunks of ``chunk_tokens`` flattened
    tokens (the last one shorter), padding included: every rank then calls the head the same
    number of times, which ZeRO-3 (a parameter gather per call) and tensor parallelism (the
    loss's all-reduces) need."""

    per_token: PerTokenLoss = per_token_cross_entropy
    chunk_tokens: int | None = None

    def __call__(
        self, hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """hidden [B, T, d_model], head: [..., d_model] -> logits (called as a module, so that
        ZeRO-3's hooks gather its weight), targets [B, T], mask [B, T] True on real tokens ->
        scalar, the same on every rank of a tensor-parallel group."""
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
        weights = mask.flatten().to(at_least_fp32(hidden.dtype))
        if self.chunk_tokens is None:
            total = _weighted_sum(self.per_token, head, hidden, targets, weights)
        else:
            n = self.chunk_tokens
            chunks = zip(hidden.split(n), targets.split(n), weights.split(n))
            total = torch.stack([self._checkpointed_sum(head, *chunk) for chunk in chunks]).sum()
        return total / weights.sum().clamp(min=1.0)

    def _checkpointed_sum(self, head: nn.Module, *chunk: torch.Tensor) -> torch.Tensor:
        """``_weighted_sum`` of one chunk, keeping only its inputs for the backward pass. Nothing
        random in a head and a cross-entropy: no RNG state to keep for the recompute."""
        return checkpoint(
            _weighted_sum,
            self.per_token,
            head,
            *chunk,
            use_reentrant=False,
            preserve_rng_state=False,
        )


def _weighted_sum(
    per_token: PerTokenLoss,
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """sum_i weights_i * loss_i over hidden [n, d_model] -> a scalar."""
    return (per_token(head(hidden), targets) * weights).sum()
