"""Tensor parallelism applied from outside the models: swap their layers for megatron-core's.

The models stay plain PyTorch. ``parallelize`` walks a model built whole (same seed on every rank)
and, following ``TP_PLAN``, replaces each listed child by a megatron-core tensor-parallel layer
holding this rank's slice of the original weights, so the parallel model computes the same
function as the unsharded one. Attention is split by heads (q/k/v column-parallel, out row-parallel,
the relative position bias keeps this rank's heads), feed-forwards by hidden units, and UL2's
vocabulary by contiguous slices (embedding and LM head). Under TP the LM head yields this rank's
vocabulary shard of the logits, [B, T, vocab / tp], and PaLI-3's token loss computes megatron-core's
vocabulary-parallel cross-entropy over them (all logits at once, or in token chunks when
``pali3_train.kernels`` chooses so afterwards). Generation gathers the full logits (it picks ids
from the whole vocabulary), so every TP rank decodes the same tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import Enum

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from pali3_train.models.attention import MultiHeadAttention
from pali3_train.models.pali3 import PaLI3
from pali3_train.models.transformer import MLP
from pali3_train.models.ul2 import UL2, FeedForward, RelativePositionBias
from pali3_train.parallel.dims import ParallelDims, tp_group, tp_rank


class Shard(Enum):
    COLUMN = "column"  # Linear: output features split; the output stays sharded (no gather)
    ROW = "row"  # Linear: input features split (takes a COLUMN output); output all-reduced
    VOCAB = "vocab"  # Embedding: rows (token ids) split; looked-up vectors all-reduced
    HEADS = "heads"  # Embedding [buckets, heads]: columns (attention heads) split; no collective


# Owner module type -> {child attribute: how it is split}. Consecutive COLUMN/ROW pairs need one
# all-reduce forward (ROW) and one backward (COLUMN's input gradient) per block.
TP_PLAN: dict[type[nn.Module], dict[str, Shard]] = {
    # Either qkv_proj or q_proj + kv_proj. The fused weights' rows are ordered by head
    # (models/projections.py), so a rank's contiguous chunk holds whole heads' q, k and v.
    MultiHeadAttention: {
        "qkv_proj": Shard.COLUMN,
        "q_proj": Shard.COLUMN,
        "kv_proj": Shard.COLUMN,
        "out_proj": Shard.ROW,
    },
    MLP: {"fc1": Shard.COLUMN, "fc2": Shard.ROW},  # SigLIP ViT/text blocks and the MAP head
    # UL2; wi is gate and up fused, its rows ordered by hidden unit
    FeedForward: {"wi": Shard.COLUMN, "wo": Shard.ROW},
    RelativePositionBias: {"embed": Shard.HEADS},
    UL2: {"embed": Shard.VOCAB, "lm_head": Shard.COLUMN},  # lm_head: logits for this vocab slice
}


# ------------------------------------------------------------------------------- entry point


def parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Apply ``TP_PLAN`` to ``model`` in place and return it. ``tp == 1`` leaves it untouched.
    For ``tp > 1``: call ``init_model_parallel(dims)`` first, and parallelize the whole model
    before DeepSpeed sees it (the full weights are read here, one layer at a time if ZeRO-3
    partitioned it at construction). Frozen parameters stay frozen."""
    if dims.tp == 1:
        return model
    targets = _plan_targets(model)
    for path, owner, name, shard in targets:  # all checks first: fail before changing anything
        _check_divisible(path, owner, getattr(owner, name), shard, dims.tp)
    if not parallel_state.model_parallel_is_initialized() or (
        parallel_state.get_tensor_model_parallel_world_size() != dims.tp
    ):
        raise RuntimeError("parallelize needs init_model_parallel(dims) first, with these dims")
    configs: dict[torch.dtype, ModelParallelConfig] = {}
    for _, owner, name, shard in targets:
        child = getattr(owner, name)
        dtype = child.weight.dtype
        config = configs.setdefault(dtype, _megatron_config(dims, dtype))
        setattr(owner, name, _swap(child, _SWAPS[shard], config, dims))
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.num_heads //= dims.tp  # this rank's heads, for anyone who reads the attribute
        if isinstance(module, PaLI3):
            module.token_loss = dataclasses.replace(
                module.token_loss, per_token=vocab_parallel_cross_entropy
            )
            module.generate = _with_full_logits(module.generate, module.ul2.lm_head)
    return model


def _swap(child: nn.Module, swap: Callable, config: ModelParallelConfig, dims: ParallelDims):
    """``swap(child, config, dims)``. A child that ZeRO-3 partitioned at construction
    (``engine/zero_init.py``) is gathered over its data-parallel group while this rank's slice
    is copied, and the new layer is partitioned at once: no rank holds more than one layer
    whole."""
    partitioned = [p for p in child.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return swap(child, config, dims)
    import deepspeed  # only a ZeRO-3 model gets here, and DeepSpeed is loaded by then

    with deepspeed.zero.GatheredParameters(partitioned):
        layer = swap(child, config, dims)
    partitioned[0].convert_to_zero_parameters(list(layer.parameters()))
    return layer


def _with_full_logits(generate: Callable, lm_head: nn.Module) -> Callable:
    """``generate`` with the LM head all-gathering its vocabulary shards (tensor-parallel
    group), as decoding picks ids from the whole vocabulary; training keeps them sharded."""

    def generate_gathered(*args, **kwargs) -> torch.Tensor:
        lm_head.gather_output = True
        try:
            return generate(*args, **kwargs)
        finally:
            lm_head.gather_output = False

    return generate_gathered


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's weights (fp32, CPU) on every rank of the TP group: each
    tensor-parallel parameter's shards are all-gathered over the TP group and concatenated
    along the dimension it is split on. Under ZeRO-3, call it with the parameters gathered."""
    state = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False):
            shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(tp_group()))]
            dist.all_gather(shards, tensor.contiguous(), group=tp_group())
            tensor = torch.cat(shards, dim=param.partition_dim)
        state[name] = tensor.float().cpu()
    return state


def _plan_targets(model: nn.Module) -> list[tuple[str, nn.Module, str, Shard]]:
    """(dotted path, owner, child name, shard) for every child named by ``TP_PLAN``."""
    targets = []
    for path, owner in model.named_modules():
        for name, shard in TP_PLAN.get(type(owner), {}).items():
            if not hasattr(owner, name):  # attention with the other projection layout
                continue
            child = getattr(owner, name)
            expected = nn.Embedding if shard in (Shard.VOCAB, Shard.HEADS) else nn.Linear
            if not isinstance(child, expected):  # megatron's layers are neither
                raise TypeError(
                    f"{path}.{name}: expected {expected.__name__}, found "
                    f"{type(child).__name__} (is the model parallelized already?)"
                )
            targets.append((f"{path}.{name}".lstrip("."), owner, name, shard))
    return targets


def _check_divisible(path: str, owner: nn.Module, child: nn.Module, shard: Shard, tp: int) -> None:
    what, size = _split_size(owner, child, shard)
    if size % tp:
        raise ValueError(f"{path}: {what} ({size}) not divisible by tensor parallel size {tp}")


def _split_size(owner: nn.Module, child: nn.Module, shard: Shard) -> tuple[str, int]:
    if isinstance(owner, MultiHeadAttention):  # a rank must hold whole heads
        return "attention heads", owner.num_heads
    if isinstance(owner, FeedForward):  # ... and whole hidden units, gate and up together
        return "hidden units", owner.wo.in_features
    if shard is Shard.COLUMN:
        return "output features", child.out_features
    if shard is Shard.ROW:
        return "input features", child.in_features
    if shard is Shard.VOCAB:
        return "vocabulary size", child.num_embeddings
    return "attention heads", child.embedding_dim


def _megatron_config(dims: ParallelDims, dtype: torch.dtype) -> ModelParallelConfig:
    # Weights are allocated on the CPU and copied in from the unsharded model (no initialisation,
    # no RNG); no sequence parallelism. (megatron-core 0.16 ignores the old async-allreduce flag:
    # the input-gradient all-reduce is always issued async and waited on, which gloo supports.)
    return ModelParallelConfig(
        tensor_model_parallel_size=dims.tp,
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )


def _weights_are_copied(_: torch.Tensor) -> None:
    raise AssertionError("parallelize copies weights in; megatron must not initialise them")


# ---------------------------------------------------------------------------- swapped layers


class _TensorOnly:
    """Mixin for megatron's linears: return the output tensor alone (megatron returns (output,
    bias) so that callers can fuse the bias) and keep nn.Linear's state-dict keys."""

    # megatron adds an empty `_extra_state` entry for TransformerEngine compatibility; dropping
    # the getter keeps `weight`/`bias` only. Loading still accepts (and ignores) the entry.
    get_extra_state = nn.Module.get_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = super().forward(x)
        # The bias is added here, not inside megatron's autograd function: that function skips
        # the bias gradient whenever the weight is frozen, even if the bias is not.
        return out if bias is None else out + bias


class ColumnParallelLinear(_TensorOnly, tensor_parallel.ColumnParallelLinear):
    """x [..., in] -> this rank's slice of the output features [..., out / tp]."""


class RowParallelLinear(_TensorOnly, tensor_parallel.RowParallelLinear):
    """This rank's slice of the input features [..., in / tp] -> full output [..., out]."""


def _column(linear: nn.Linear, config: ModelParallelConfig, dims: ParallelDims) -> nn.Module:
    return _split_linear(ColumnParallelLinear, linear, config, dims, gather_output=False)


def _row(linear: nn.Linear, config: ModelParallelConfig, dims: ParallelDims) -> nn.Module:
    return _split_linear(RowParallelLinear, linear, config, dims, input_is_parallel=True)


def _split_linear(
    cls: type, linear: nn.Linear, config: ModelParallelConfig, dims: ParallelDims, **kwargs
) -> nn.Module:
    """A column-parallel layer splits the weight's output rows (dim 0) and the bias with them; a
    row-parallel one splits the input columns (dim 1) and keeps the bias whole (added once,
    after the all-reduce)."""
    layer = cls(
        linear.in_features,
        linear.out_features,
        config=config,
        init_method=_weights_are_copied,
        bias=linear.bias is not None,
        skip_bias_add=True,
        **kwargs,
    )
    column = cls is ColumnParallelLinear
    _copy_shard(layer.weight, linear.weight, dim=0 if column else 1, tp=dims.tp)
    if linear.bias is not None:
        if column:
            _copy_shard(layer.bias, linear.bias, dim=0, tp=dims.tp)
        else:
            _copy_full(layer.bias, linear.bias)
    return layer.to(linear.weight.device)


def _vocab(embed: nn.Embedding, config: ModelParallelConfig, dims: ParallelDims) -> nn.Module:
    layer = tensor_parallel.VocabParallelEmbedding(
        embed.num_embeddings, embed.embedding_dim, init_method=_weights_are_copied, config=config
    )
    _copy_shard(layer.weight, embed.weight, dim=0, tp=dims.tp)
    return layer.to(embed.weight.device)


def _heads(embed: nn.Embedding, config: ModelParallelConfig, dims: ParallelDims) -> nn.Module:
    # A plain embedding with fewer columns: each rank looks up the biases of its own heads only.
    # skip_init: no random initialisation (it would advance the RNG differently from the
    # unsharded model's), the weights are copied in.
    layer = torch.nn.utils.skip_init(
        nn.Embedding,
        embed.num_embeddings,
        embed.embedding_dim // dims.tp,
        device=embed.weight.device,
        dtype=embed.weight.dtype,
    )
    _copy_shard(layer.weight, embed.weight, dim=1, tp=dims.tp)
    return layer


_SWAPS: dict[Shard, Callable[[nn.Module, ModelParallelConfig, ParallelDims], nn.Module]] = {
    Shard.COLUMN: _column,
    Shard.ROW: _row,
    Shard.VOCAB: _vocab,
    Shard.HEADS: _heads,
}


def _copy_shard(param: nn.Parameter, full: torch.Tensor, dim: int, tp: int) -> None:
    """Copy this rank's contiguous slice of ``full`` along ``dim`` and tag ``param`` the way
    megatron-core and DeepSpeed recognise a TP-sharded parameter (gradient norms count it on
    every rank; replicated parameters only on TP rank 0)."""
    _copy_full(param, full.chunk(tp, dim)[tp_rank()])
    if not hasattr(param, "tensor_model_parallel"):  # megatron tags only some of its own
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _copy_full(param: nn.Parameter, full: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(full)
    param.requires_grad_(full.requires_grad)  # frozen stays frozen


# ------------------------------------------------------------------------------------- loss


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``losses.text.per_token_cross_entropy`` for vocabulary-sharded logits: logits
    [N, vocab / tp] (this TP rank's contiguous vocabulary slice), targets [N] global ids -> fp32
    per-token losses [N], the same on every rank of the TP group (all-reduces over it)."""
    # megatron's kernel turns its input into softmax probabilities in place when it is already
    # fp32 (`.float()` is then a no-op): give it a copy, so the caller's logits stay logits.
    return tensor_parallel.vocab_parallel_cross_entropy(
        logits.to(torch.float32, copy=True), targets
    )
