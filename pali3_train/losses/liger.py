"""The LM head and its token cross-entropy as liger-kernel's fused linear cross-entropy.

liger's Triton kernel walks the tokens in chunks (of about tokens x d_model / vocab), computing each
chunk's logits, its loss and at once its gradients (into the hidden states and the head weight),
so no [tokens, vocab] logits outlive a chunk; the backward pass only scales the stored gradients.
It reads the head's weight tensor directly: it needs the whole vocabulary on one rank (no tensor
parallelism) and a weight that is present outside a module call (not ZeRO-3, whose hooks gather
it only around one); ``pali3_train.kernels`` chooses it only then. Triton runs it on CUDA, and on
CPU tensors only under ``TRITON_INTERPRET=1`` set before triton is first imported (the tests).
"""

from __future__ import annotations

import torch
from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
from torch import nn

IGNORE = -100  # the target id liger skips: padding's


def liger_token_loss(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``TokenLoss``'s contract: hidden [B, T, d_model], head d_model -> vocab, targets [B, T],
    mask [B, T] True on real tokens -> the mean over real tokens (fp32 scalar)."""
    targets = targets.flatten().masked_fill(~mask.flatten(), IGNORE)
    total = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        targets,
        bias=head.bias,
        ignore_index=IGNORE,
        reduction="sum",  # divided below: no NaN when a micro-batch has no real token
        # The head gradient summed over chunks in fp32 (in bf16 every chunk's sum would round):
        # an fp32 [vocab, d_model] buffer during the forward pass, the price of the precision
        # policy (the loss in fp32).
        accum_dtype=torch.float32,
    )
    return total / mask.sum().clamp(min=1)
