"""How many bytes a run needs per device, estimated without starting it: the model states (from
the parameters one tensor-parallel rank holds) and one micro-batch's activations (from the
towers the stage's spec describes). The dry run (``engine.dry_run``) and the capacity planner
(``cluster.plan``) print these figures.

Model states. P = parameters held by one tensor-parallel (TP) rank (layers in
``parallel.TP_PLAN`` hold 1/t of their weights), T = those of them that train, L = the largest
single layer on the rank, N = data-parallel (DP) size, w = 2 bytes (bf16) or 4 (fp32)::

    weights     w*P        / N under ZeRO-3 (frozen ones too; parameters under ZeRO-3's
                           persistence threshold stay whole on every rank)
    gradients   w*T        / N under ZeRO-2 and 3
    optimizer   16*T       / N under ZeRO-1, 2 and 3: fp32 master copy, fp32 gradient, Adam m, v
                           (without ZeRO in fp32, torch's AdamW keeps m and v only: 8*T)
    gathered    2*w*L      ZeRO-3 only: one layer's weights and gradients gathered whole
                           (DeepSpeed's assumption; prefetching can hold a few layers more)

For a bf16 model that trains everything without TP this is DeepSpeed's own estimate
(``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_...`` in deepspeed.runtime.zero,
no offload), except that ZeRO-3's 16-bit gradient partition (w*T/N), which DeepSpeed 0.19.8
allocates (``grad_partitions_flat_buffer``) but its estimator leaves out, is counted here.

Activations of one micro-batch (b samples; a block of width h over s tokens; t = TP size), after
Korthikanti et al. 2022 (arXiv 2205.05198: a layer's activations under tensor parallelism without
sequence parallelism) less the attention-score term, which the fused kernels of
``scaled_dot_product_attention`` do not keep: s*b*h*(10 + 24/t) bytes per block at
16 bit (twice that in fp32). With activation checkpointing a block keeps only its input, w*s*b*h,
and one block at a time is recomputed whole. A tower that trains nothing and receives no gradient
(the frozen ViT of stage 1) keeps nothing. Added whole: UL2's encoder attention bias
[b, heads/t, s, s], the decoder's cross-attention keys and values of every layer, and the token
cross-entropy's own memory on the path ``kernels.cross_entropy`` takes on a GPU
(``cross_entropy_bytes``). Real use also has allocator fragmentation, communication buffers and
the CUDA context (~1 GiB): keep a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from pali3_train.config import Config, ConfigError
from pali3_train.kernels import Kernels, resolve_kernels
from pali3_train.params import count

GiB = 2**30
BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZER_BYTES = 16  # fp32 master weights + fp32 gradients + Adam's two moments, per parameter
LOGIT_BYTES = 12  # the token cross-entropy's peak per logit held at once (``cross_entropy_bytes``)


# ------------------------------------------------------------------------------ model states


class ModelStates(NamedTuple):
    """Bytes per device; see the module docstring for the accounting."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float

    @property
    def total(self) -> float:
        return sum(self)


def model_states(
    params: int,
    trainable: int,
    largest_layer: int,
    dp: int,
    zero_stage: int,
    precision: str,
    persistent: int = 0,
) -> ModelStates:
    """Per-device bytes of weights, gradients and AdamW state for ``params`` parameters on one
    TP rank (``trainable`` of them train), ``dp`` data-parallel ranks, a ZeRO stage and the
    model precision. ``persistent``: parameters that ZeRO-3 leaves whole on every rank."""
    w = BYTES[precision]
    weights = w * (persistent + (params - persistent) / dp) if zero_stage == 3 else w * params
    gradients = w * trainable / (dp if zero_stage >= 2 else 1)
    per_param = 8 if zero_stage == 0 and precision == "fp32" else OPTIMIZER_BYTES
    optimizer = per_param * trainable / (dp if zero_stage >= 1 else 1)
    gathered = 2 * w * largest_layer if zero_stage == 3 else 0
    return ModelStates(weights, gradients, optimizer, gathered)


# ---------------------------------------------------------------------------- the stage's model


class Count(NamedTuple):
    name: str
    total: int
    trainable: int


@dataclass(frozen=True)
class RankParams:
    """What one tensor-parallel rank holds."""

    params: int
    trainable: int
    largest_layer: int
    persistent: int  # parameters below ZeRO-3's persistence threshold


def module_counts(model: nn.Module) -> list[Count]:
    """Total and trainable parameters per top-level module; the model's own parameters (SigLIP's
    temperature and bias) as one row, "other"."""
    rows = [
        Count(name, count(child), sum(p.numel() for p in child.parameters() if p.requires_grad))
        for name, child in model.named_children()
        if count(child)
    ]
    own = dict(model.named_parameters(recurse=False))
    if own:
        total = sum(p.numel() for p in own.values())
        rows.append(Count("other", total, sum(p.numel() for p in own.values() if p.requires_grad)))
    return rows


def local_numels(model: nn.Module, tp: int, where: str = "config") -> dict[int, int]:
    """id(parameter) -> its elements on one TP rank, following ``TP_PLAN`` like ``parallelize``:
    column-parallel weights and biases, row-parallel weights, vocabulary and head embeddings are
    split in t; everything else is replicated."""
    local = {id(p): p.numel() for p in model.parameters()}
    if tp == 1:
        return local
    from pali3_train.parallel.tensor_parallel import Shard, _check_divisible, _plan_targets

    for path, owner, name, shard in _plan_targets(model):
        child = getattr(owner, name)
        try:
            _check_divisible(path, owner, child, shard, tp)
        except ValueError as exc:
            raise ConfigError(where, "parallel.tensor_parallel_size", str(exc)) from None
        split = [child.weight]
        if shard is Shard.COLUMN and child.bias is not None:
            split.append(child.bias)
        for p in split:
            local[id(p)] = p.numel() // tp
    return local


def rank_params(model: nn.Module, tp: int, persistence_threshold: float, where: str) -> RankParams:
    """Parameters one TP rank holds; the largest layer counts a module's own parameters, as
    DeepSpeed's ``model_to_params`` does; ``persistent`` those under the ZeRO-3 threshold."""
    local = local_numels(model, tp, where)
    params = list(model.parameters())
    largest = max(sum(local[id(p)] for p in m.parameters(recurse=False)) for m in model.modules())
    return RankParams(
        params=sum(local[id(p)] for p in params),
        trainable=sum(local[id(p)] for p in params if p.requires_grad),
        largest_layer=largest,
        persistent=sum(local[id(p)] for p in params if local[id(p)] < persistence_threshold),
    )


# ------------------------------------------------------------------------------- activations


class Tower(NamedTuple):
    """A stack of blocks and what it keeps for the backward pass, in bytes per device."""

    name: str
    blocks: int
    seq: int
    width: int
    plain: float  # without activation checkpointing: every block's activations, plus extras
    checkpointed: float  # block inputs only, plus extras
    largest_block: float  # what checkpointing recomputes at once (0: keeps nothing)


@dataclass(frozen=True)
class Activations:
    towers: tuple[Tower, ...]
    logits: float  # the token cross-entropy's bytes (``cross_entropy_bytes``)
    loss_path: str = "plain"  # its ``kernels.cross_entropy`` path

    @property
    def recompute(self) -> float:
        return max((t.largest_block for t in self.towers), default=0.0)

    def total(self, checkpointing: bool) -> float:
        if checkpointing:
            return sum(t.checkpointed for t in self.towers) + self.recompute + self.logits
        return sum(t.plain for t in self.towers) + self.logits


# kernels.cross_entropy -> what the dry run says of it ({chunk}: the chunk's tokens)
LOSS_PATHS = {
    "plain": "all logits at once, fp32",
    "chunked": "{chunk}-token chunks of logits recomputed in the backward, fp32",
    "fused": "{chunk}-token chunks, gradients in the forward pass, fp32",
    "liger": "liger-kernel's fused linear cross-entropy, fp32",
}


def planned_kernels(cfg: Config) -> Kernels:
    """The kernels a run of ``cfg`` uses on the GPUs a plan is made for."""
    return resolve_kernels(cfg.kernels, torch.device("cuda"), cfg.parallel)


def cross_entropy_bytes(
    path: str, tokens: int, vocab: int, width: int, chunk_tokens: int, precision: str
) -> float:
    """What the token cross-entropy holds at its peak beyond the decoder's activations and one
    head gradient (which every path writes once, and the model states count): ``tokens`` of one
    micro-batch, ``vocab`` = the head's outputs on one TP rank, ``width`` its inputs. Measured
    with ``benchmarks/cross_entropy.py``:

    plain: 12 bytes a logit, fp32 or bf16: the fp32 logits (or the fp32 copy of 16-bit ones),
    their fp32 log-softmax kept for the backward pass and its fp32 gradient.
    chunked: the same for one chunk (recomputed in the backward pass), and, with two chunks or
    more, two more head gradients: autograd sums the chunks' head gradients as they come, out of
    place for the first two, so three exist at once.
    liger: the head gradient's fp32 accumulator when the weights are 16-bit (in fp32 it is the
    head gradient itself), the input gradient kept from the forward pass and a chunk of about
    tokens x width logits.
    fused: the same accumulator and input gradient, and one chunk of logits: 4 bytes a logit in
    fp32, 6 in bf16 (the fp32 copy beside the 16-bit GEMM's output or input)."""
    w = BYTES[precision]
    if path == "fused":
        accumulator = 4 * vocab * width if w < 4 else 0
        chunk = (4 if w == 4 else 4 + w) * min(chunk_tokens, tokens) * vocab
        return accumulator + w * tokens * width + chunk
    if path == "chunked":
        accumulating = 2 * w * vocab * width if tokens > chunk_tokens else 0
        return LOGIT_BYTES * min(chunk_tokens, tokens) * vocab + accumulating
    if path == "liger":
        return (4 * vocab * width if w < 4 else 0) + 2 * w * tokens * width
    return LOGIT_BYTES * tokens * vocab


def trains(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a trainable parameter."""
    return any(p.requires_grad for m in modules for p in m.parameters())


def tower(cfg: Config, name: str, blocks: int, seq: int, width: int, keeps: bool,
          extra: float = 0.0, per_sample: int = 1) -> Tower:  # fmt: skip
    """The activations of ``blocks`` blocks of width ``width`` over ``seq`` tokens for one
    micro-batch of ``cfg`` (module docstring); ``keeps``: whether the tower keeps any (it trains
    or passes a gradient on); ``extra``: bytes it keeps besides its blocks; ``per_sample``:
    sequences per sample (a video's frames, each through the ViT on its own)."""
    if not keeps:
        return Tower(name, blocks, seq, width, 0.0, 0.0, 0.0)
    b, t = cfg.train.micro_batch_size * per_sample, cfg.parallel.tensor_parallel_size
    w = BYTES[cfg.train.precision]
    block = seq * b * width * (10 + 24 / t) * w / 2
    inputs = w * seq * b * width
    return Tower(name, blocks, seq, width, blocks * block + extra, blocks * inputs + extra, block)
