"""The LM head and its token cross-entropy fused, in PyTorch ops: liger-kernel's algorithm for
every device.

Walking the tokens a chunk at a time, the forward pass computes each chunk's logits, its loss
and, while the logits are at hand, its gradients: the softmax minus the one-hot target, formed in
place over the logits, then multiplied into the hidden states' gradient (written into its rows of
one [tokens, d_model] tensor) and added into the head gradient's accumulator (one [vocab, d_model]
tensor, ``addmm_`` in place, in fp32). The backward pass only scales what the forward left. So at
its peak the loss holds one chunk's logits, the accumulator and the input gradient; the plain
path holds all logits three times over, and the chunked one three head gradients, autograd
summing the chunks' contributions out of place (``benchmarks/cross_entropy.py``).

liger runs the same walk as Triton kernels, which need CUDA; this path is what the CPU takes,
and tests compare the two with the plain path. Like liger it reads the head's weight directly:
the whole vocabulary on one rank (no tensor parallelism) and a weight present outside a module
call (not ZeRO-3), which ``pali3_train.kernels`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.precision import at_least_fp32, upcast


@dataclass(frozen=True)
class FusedLinearCrossEntropy:
    """``TokenLoss``'s contract with the head fused in: chunks of ``chunk_tokens`` tokens."""

    chunk_tokens: int = 256

    def __call__(
        self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """hidden [B, T, d_model], head d_model -> vocab, targets [B, T], mask [B, T] True on
        real tokens -> the mean over real tokens (fp32 scalar)."""
        weights = mask.flatten().to(at_least_fp32(hidden.dtype))
        total = _FusedLinearCrossEntropy.apply(
            hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), weights,
            self.chunk_tokens,
        )  # fmt: skip
        return total / weights.sum().clamp(min=1.0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i weights_i * CE(hidden_i @ weight.T + bias, target_i), gradients from the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, chunk_tokens):
        acc = at_least_fp32(weight.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h, t, w = hidden[rows], targets[rows], weights[rows]
            logits = upcast(F.linear(h, weight, bias))
            total += (_loss_(logits, t) * w).sum()  # logits now d CE / d logits
            grad_logits = logits.mul_(w[:, None])
            torch.matmul(grad_logits.to(weight.dtype), weight, out=grad_hidden[rows])
            grad_weight.addmm_(grad_logits.T, upcast(h))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, grad_logits  # before the next chunk's logits are allocated
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        """Scale the forward's gradients by d(loss)/d(total), in place: the head gradient is the
        size of the head, and a copy would double it. A second backward of the same forward
        (``retain_graph``) is refused by autograd's version check on these saved tensors."""
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(grad_total.to(grad.dtype))
        to_weight = ctx.weight_dtype
        grad_bias = None if grad_bias is None else grad_bias.to(to_weight)
        return grad_hidden, grad_weight.to(to_weight), grad_bias, None, None, None


def _loss_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> per-token CE [n]; ``logits`` becomes softmax - one_hot(targets), the
    gradient of the CE, in place: every step overwrites the one buffer, so no second [n, V]
    tensor exists (``torch.logsumexp`` would allocate one)."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(1, keepdim=True)
    logits.div_(sums)
    logits.scatter_add_(1, targets[:, None], logits.new_full((len(targets), 1), -1.0))
    return (sums.log_() + top).squeeze(1) - target_logit
