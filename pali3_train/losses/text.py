"""Token cross-entropy over target tokens only: padding contributes neither loss nor count."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over real target tokens. logits [B, T, V] (any float dtype; computed in fp32),
    targets [B, T] token ids, mask [B, T] True on real tokens -> scalar."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = mask.flatten().to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
