"""SigLIP's pairwise sigmoid loss, computed densely over one batch.

Every image-text pair is an independent binary classification: +1 for matching pairs (the
diagonal), -1 for all others; logits are t * <img, txt> + b with t = exp(t'). The sum over all
pairs is normalised by the batch size, as in the paper. This dense form is also the reference
the distributed chunked loss is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """image_emb, text_emb [n, E], L2-normalised, row i of each forming a pair;
    logit_scale = t' (log temperature), logit_bias = b -> scalar loss."""
    logits = image_emb @ text_emb.T * logit_scale.exp() + logit_bias
    labels = 2 * torch.eye(len(logits), dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)
