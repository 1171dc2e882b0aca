"""The head and cross-entropy fused in PyTorch ops against all logits at once (``TokenLoss()``,
itself tested against the loss by hand): the loss and the gradients into the hidden states, the
head weight and its bias, with padding masked out and a token count (21) that no chunk divides;
in fp32 within 1e-5, in bf16 within bf16's rounding; and its memory: one chunk's logits and one
head-sized accumulator, however many tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.allocations import peak_bytes
from pali3_train.kernels import apply_kernels
from pali3_train.losses.fused_linear import FusedLinearCrossEntropy
from pali3_train.losses.text import TokenLoss
from tests.losses.test_text import (
    TOL,
    _head_inputs,
    _loss_and_grads,
    _odd_batch,
    _pali3_loss_and_grads,
    resolved,
)  # fmt: skip
from tests.parallel.helpers import tiny_pali3


@pytest.mark.parametrize("chunk_tokens", [1, 4, 21, 64])
def test_fused_gives_the_loss_and_gradients_of_all_logits(chunk_tokens):
    inputs = _head_inputs()
    got = _loss_and_grads(FusedLinearCrossEntropy(chunk_tokens), *inputs)
    expected = _loss_and_grads(TokenLoss(), *inputs)
    for a, b, what in zip(got, expected, ["loss", "hidden", "weight", "bias"]):
        torch.testing.assert_close(a, b, **TOL, msg=what)


def test_a_head_without_bias_and_a_scaled_loss():
    """The backward scales the forward's gradients by the upstream gradient (here 3)."""
    hidden, head, targets, mask = _head_inputs()
    head.bias = None

    def grads(loss_fn) -> list[torch.Tensor]:
        hidden.grad, head.weight.grad = None, None
        loss = 3 * loss_fn(hidden, head, targets, mask)
        loss.backward()
        return [loss.detach(), hidden.grad, head.weight.grad]

    for a, b in zip(grads(FusedLinearCrossEntropy(4)), grads(TokenLoss())):
        torch.testing.assert_close(a, b, **TOL)


def test_bf16_follows_fp32_within_its_rounding():
    hidden, head, targets, mask = _head_inputs()
    reference = _loss_and_grads(TokenLoss(), hidden, head, targets, mask)
    low = hidden.detach().bfloat16().requires_grad_()
    head16 = copy.deepcopy(head).bfloat16()
    got = _loss_and_grads(FusedLinearCrossEntropy(4), low, head16, targets, mask)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, reference):
        torch.testing.assert_close(a.float(), b, atol=0.05 * b.abs().max().item(), rtol=0.02)


def test_a_batch_of_padding_only_gives_zero_not_nan():
    hidden, head, targets, mask = _head_inputs()
    loss = FusedLinearCrossEntropy(4)(hidden, head, targets, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_a_second_backward_is_refused_not_silently_doubled():
    hidden, head, targets, mask = _head_inputs()
    loss = FusedLinearCrossEntropy(4)(hidden, head, targets, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_pali3_fused_matches_all_logits():
    """Through the model: ``kernels.cross_entropy=fused`` puts this loss on PaLI-3, and every
    parameter's gradient is the plain model's."""
    full = tiny_pali3()
    model = apply_kernels(copy.deepcopy(full), resolved(cross_entropy="fused"))
    assert isinstance(model.token_loss, FusedLinearCrossEntropy)
    batch = _odd_batch(full.cfg)
    expected, got = _pali3_loss_and_grads(full, batch), _pali3_loss_and_grads(model, batch)
    torch.testing.assert_close(got, expected, **TOL)
    for (name, p), q in zip(full.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_holds_one_chunk_and_one_accumulator():
    """Peak allocation (profiler events) beyond the inputs: one chunk's logits, the head-sized
    accumulator and the input gradient, against plain's three full logit matrices."""
    tokens, vocab, width, chunk = 512, 2048, 8, 32
    hidden = torch.randn(1, tokens, width, requires_grad=True)
    head = nn.Linear(width, vocab, bias=False)
    targets = torch.randint(0, vocab, (1, tokens))
    mask = torch.ones(1, tokens, dtype=torch.bool)

    def peak(loss_fn) -> int:
        return peak_bytes(lambda: loss_fn(hidden, head, targets, mask).backward(), hidden.device)

    logits, accumulator = tokens * vocab * 4, vocab * width * 4
    fused = peak(FusedLinearCrossEntropy(chunk))
    assert fused <= 2 * chunk * vocab * 4 + 2 * accumulator + 2 * tokens * width * 4
    assert fused < peak(TokenLoss()) / 8 and fused < logits / 4
