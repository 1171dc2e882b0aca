"""Parallelism applied from outside the models (torchtitan's habit): the layout and its process
groups (``dims``), tensor parallelism by swapping in megatron-core layers from one plan
(``tensor_parallel``), and activation checkpointing (``checkpointing``). A trainer builds the
model whole, then calls ``init_model_parallel`` -> ``parallelize`` ->
``apply_activation_checkpointing`` and hands the result, with ``DeepSpeedMPU()``, to DeepSpeed."""

from pali3_train.parallel.checkpointing import AC_PLAN, apply_activation_checkpointing
from pali3_train.parallel.dims import (
    DeepSpeedMPU,
    ParallelDims,
    destroy_model_parallel,
    dp_group,
    dp_rank,
    dp_size,
    init_model_parallel,
    tp_group,
    tp_rank,
)
from pali3_train.parallel.tensor_parallel import (
    TP_PLAN,
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    full_state_dict,
    parallelize,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "AC_PLAN",
    "TP_PLAN",
    "ColumnParallelLinear",
    "DeepSpeedMPU",
    "ParallelDims",
    "RowParallelLinear",
    "Shard",
    "apply_activation_checkpointing",
    "destroy_model_parallel",
    "dp_group",
    "dp_rank",
    "dp_size",
    "full_state_dict",
    "init_model_parallel",
    "parallelize",
    "tp_group",
    "tp_rank",
    "vocab_parallel_cross_entropy",
]
