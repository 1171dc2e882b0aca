"""The token cross-entropy from hidden states and the LM head: all logits at once against the
loss written out by hand, and the token-chunked path against all logits at once (loss and the
gradients into the hidden states and the head), on a head alone and on PaLI-3, at TP=1 and at
TP=2 (two real gloo ranks, megatron-core's vocabulary-parallel cross-entropy). fp32, 1e-5.
Token counts are odd and not multiples of the chunk; padding is masked out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmarks.allocations import peak_bytes
from pali3_train.config.schema import KernelsConfig, ParallelConfig
from pali3_train.kernels import Kernels, apply_kernels, resolve_kernels
from pali3_train.losses.text import TokenLoss
from pali3_train.parallel import ParallelDims, apply_activation_checkpointing, parallelize
from tests.parallel.helpers import assemble, gather_tp, pali3_batch, run_on_ranks, tiny_pali3

TOL = {"atol": 1e-5, "rtol": 1e-5}
BATCH, LENGTH, WIDTH, VOCAB = 3, 7, 16, 50  # 21 tokens


def _head_inputs(seed: int = 0) -> tuple[torch.Tensor, nn.Linear, torch.Tensor, torch.Tensor]:
    """hidden [3, 7, 16] (a leaf), a head with a bias, targets, and a mask with padded tails."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, LENGTH, WIDTH, generator=g).requires_grad_()
    head = nn.Linear(WIDTH, VOCAB)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, WIDTH, generator=g))
        head.bias.copy_(torch.randn(VOCAB, generator=g))
    targets = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    lengths = torch.tensor([7, 4, 1])
    mask = torch.arange(LENGTH)[None] < lengths[:, None]
    return hidden, head, targets, mask


def _loss_and_grads(loss_fn, hidden, head, targets, mask) -> list[torch.Tensor]:
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    loss = loss_fn(hidden, head, targets, mask)
    loss.backward()
    return [loss.detach(), hidden.grad, head.weight.grad, head.bias.grad]


def _by_hand(hidden, head, targets, mask) -> torch.Tensor:
    """The definition: softmax cross-entropy of the real tokens' logits, averaged over them."""
    logits = hidden[mask] @ head.weight.T + head.bias
    return F.cross_entropy(logits, targets[mask])


def test_all_logits_at_once_is_the_masked_mean_by_hand():
    inputs = _head_inputs()
    got = _loss_and_grads(TokenLoss(), *inputs)
    expected = _loss_and_grads(_by_hand, *inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 21, 64])
def test_chunks_give_the_loss_and_gradients_of_all_logits(chunk_tokens):
    """Chunks of 1, 4 (the last one 1 token), exactly all 21 tokens, and more than there are."""
    inputs = _head_inputs()
    got = _loss_and_grads(TokenLoss(chunk_tokens=chunk_tokens), *inputs)
    expected = _loss_and_grads(TokenLoss(), *inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)


def test_chunks_without_autograd_give_the_same_loss():
    hidden, head, targets, mask = _head_inputs()
    with torch.no_grad():
        got = TokenLoss(chunk_tokens=4)(hidden, head, targets, mask)
    torch.testing.assert_close(got, TokenLoss()(hidden, head, targets, mask), **TOL)


@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_a_batch_of_padding_only_gives_zero_not_nan(chunk_tokens):
    hidden, head, targets, mask = _head_inputs()
    loss = TokenLoss(chunk_tokens=chunk_tokens)(hidden, head, targets, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_chunks_hold_one_chunks_logits_at_a_time():
    """What the chunking is for, in the forward and the backward pass: the peak allocation
    (profiler events) follows the chunk, not the token count. Width 8 keeps the head gradients
    (which every path writes, and the chunked one sums) small against the logits; the figures
    at real sizes are in benchmarks/results/cross_entropy.md."""
    tokens, vocab, chunk = 512, 2048, 32
    hidden = torch.randn(1, tokens, 8, requires_grad=True)
    head = nn.Linear(8, vocab, bias=False)
    targets = torch.randint(0, vocab, (1, tokens))
    mask = torch.ones(1, tokens, dtype=torch.bool)

    def peak(loss_fn) -> int:
        return peak_bytes(lambda: loss_fn(hidden, head, targets, mask).backward(), hidden.device)

    logits = tokens * vocab * 4
    plain, chunked = peak(TokenLoss()), peak(TokenLoss(chunk_tokens=chunk))
    assert plain >= 2 * logits  # the fp32 logits' log-softmax and its gradient at least
    assert chunked <= 3 * chunk * vocab * 4 + 4 * head.weight.numel() * 4 < plain / 4


# ------------------------------------------------------------------------------- PaLI-3


def resolved(tp: int = 1, **choices) -> Kernels:
    """What a CPU run resolves ``kernels:`` with ``choices`` to (the other kernels as a run has
    them: under TP, fused projections, which the TP plan shards)."""
    parallel = ParallelConfig(tensor_parallel_size=tp)
    return resolve_kernels(KernelsConfig(**choices), torch.device("cpu"), parallel)


def chunked(tp: int = 1) -> Kernels:
    return resolved(tp, cross_entropy="chunked", cross_entropy_chunk_tokens=4)


def _odd_batch(cfg) -> tuple[torch.Tensor, ...]:
    """Three samples, five target tokens each (15, not a multiple of 4), one padded."""
    images, prompt, prompt_mask, target, target_mask = pali3_batch(cfg, batch=3)
    return images, prompt, prompt_mask, target[:, :5], target_mask[:, :5]


def _pali3_loss_and_grads(model: nn.Module, batch) -> dict:
    output = model(*batch)
    output.hidden.retain_grad()
    output.loss.backward()
    return {"loss": output.loss.detach(), "hidden": output.hidden.grad}


def test_pali3_chunked_matches_all_logits():
    """The model hands its hidden states and head to the loss: apply_kernels' chunked loss gives
    the plain model's loss and gradients, every parameter's included."""
    full = tiny_pali3()
    model = apply_kernels(copy.deepcopy(full), chunked())
    batch = _odd_batch(full.cfg)
    expected, got = _pali3_loss_and_grads(full, batch), _pali3_loss_and_grads(model, batch)
    assert model.token_loss == TokenLoss(chunk_tokens=4)
    torch.testing.assert_close(got, expected, **TOL)
    for (name, p), q in zip(full.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _pali3_tp2_chunked(dims: ParallelDims, out: str) -> None:
    full = tiny_pali3()
    batch = _odd_batch(full.cfg)
    variants = {  # copied before the reference has gradients
        "chunked": apply_kernels(parallelize(copy.deepcopy(full), dims), chunked(dims.tp)),
        "chunked+checkpointing": apply_kernels(
            apply_activation_checkpointing(parallelize(copy.deepcopy(full), dims)),
            chunked(dims.tp),
        ),
    }
    results = {"reference": _pali3_loss_and_grads(full, batch)}
    results["reference"]["grads"] = {n: p.grad for n, p in full.named_parameters()}
    for label, model in variants.items():
        got = _pali3_loss_and_grads(model, batch)
        results[label] = {
            "loss": gather_tp(got["loss"]),
            "hidden": gather_tp(got["hidden"]),
            "grads": assemble(model, lambda p: p.grad),
            "token_loss": (model.token_loss.per_token.__name__, model.token_loss.chunk_tokens),
        }
    if dist.get_rank() == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def pali3_tp2(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("chunked_tp") / "results.pt"
    run_on_ranks(_pali3_tp2_chunked, 2, 2, str(out))
    return torch.load(out)


@pytest.mark.parametrize("variant", ["chunked", "chunked+checkpointing"])
def test_pali3_tp2_chunked_matches_the_unsharded_model(pali3_tp2, variant):
    """Vocabulary-sharded head, chunks of 4 into megatron-core's vocabulary-parallel
    cross-entropy: the unsharded plain model's loss, hidden-state gradients (on both ranks) and
    parameter gradients (shards reassembled)."""
    ref, got = pali3_tp2["reference"], pali3_tp2[variant]
    assert got["token_loss"] == ("vocab_parallel_cross_entropy", 4)
    for rank_loss, rank_hidden in zip(got["loss"], got["hidden"]):
        torch.testing.assert_close(rank_loss, ref["loss"], **TOL)
        torch.testing.assert_close(rank_hidden, ref["hidden"], **TOL)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, expected in ref["grads"].items():
        grad = got["grads"][name]
        expected = expected if grad.shape == expected.shape else expected.expand_as(grad)
        torch.testing.assert_close(grad, expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")
