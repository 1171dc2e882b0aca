"""The parallel layout in one object, and the process groups megatron-core builds from it.

Every rank belongs to one tensor-parallel (TP) group of ``tp`` consecutive ranks (megatron-core's
default order, so a TP group stays inside a node) and to one data-parallel (DP) group of the ranks
that hold the same shard. Code below the entry point asks these helpers, never the environment.
megatron-core assumes CUDA in a few places that CPU runs (gloo) reach; ``init_model_parallel``
installs two small shims for those when CUDA is absent, ``destroy_model_parallel`` removes them.
``DeepSpeedMPU`` hands DeepSpeed the same groups, so that ZeRO shards over DP only and gradient
norms count each TP shard once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as megatron_random

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ParallelDims:
    """``world_size`` ranks = ``tp`` (tensor parallel) x ``dp`` (data parallel)."""

    world_size: int
    tp: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.tp < 1:
            raise ValueError(f"tensor parallel size must be >= 1, got {self.tp}")
        if self.world_size % self.tp:
            raise ValueError(
                f"tensor parallel size {self.tp} does not divide world size {self.world_size}: "
                f"every data-parallel replica needs a full tensor-parallel group"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.tp


def init_model_parallel(dims: ParallelDims, timeout_s: float = 1800.0) -> None:
    """Build megatron-core's TP and DP groups, their collectives timing out after ``timeout_s``
    like the default group's. Call on every rank after ``torch.distributed.init_process_group``
    (gloo on CPU; nccl on GPU, after ``torch.cuda.set_device``)."""
    if not dist.is_initialized():
        raise RuntimeError("initialise torch.distributed before init_model_parallel")
    if dist.get_world_size() != dims.world_size:
        raise ValueError(
            f"ParallelDims.world_size={dims.world_size} but torch.distributed has "
            f"{dist.get_world_size()} ranks"
        )
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("model parallel groups already exist; call destroy_model_parallel()")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        distributed_timeout_minutes=max(1, round(timeout_s / 60)),
    )
    if not torch.cuda.is_available():
        _install_cpu_shims()


def destroy_model_parallel() -> None:
    """Forget megatron-core's groups (the default process group stays) and remove the CPU shims."""
    parallel_state.destroy_model_parallel()
    # megatron-core 0.16.1 forgets to reset these. A group left referenced here outlives
    # destroy_process_group; a process forked later inherits it without its gloo threads, and when
    # the next initialize_model_parallel overwrites the global there, its destructor hangs or
    # segfaults (seen: a test suite that ran one in-process rank, then forked ranks).
    parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None
    parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO = None
    parallel_state._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None
    parallel_state._HYBRID_DP_CP_GROUPS = {}
    _remove_cpu_shims()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_group() -> ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_group() -> ProcessGroup:
    return parallel_state.get_data_parallel_group()


class DeepSpeedMPU:
    """What ``deepspeed.initialize(mpu=...)`` asks of a model-parallel unit (DeepSpeed 0.19.8).

    Without it DeepSpeed treats every rank as a data-parallel peer: ZeRO would shard and average
    across TP ranks holding different shards, and gradient norms would count replicated parameters
    once per TP rank. We have no pipeline parallelism, so "model parallel" is tensor parallel.
    Deliberately absent: ``initialize_sequence_parallel`` (its mere presence switches DeepSpeed to
    Ulysses sequence parallelism and drops the DP group) and the other sequence-parallel getters.
    """

    # DeepSpeed's name for the group across which parameters differ (gradient norms, clipping).
    def get_model_parallel_rank(self) -> int:
        return tp_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> ProcessGroup:
        return tp_group()

    # Megatron's names for the same thing (DeepSpeed's bwc helpers prefer these).
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return dp_rank()

    def get_data_parallel_world_size(self) -> int:
        return dp_size()

    def get_data_parallel_group(self) -> ProcessGroup:
        return dp_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(dp_group())

    # One pipeline stage (checkpoint metadata and the fast checkpoint writer read these).
    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()


# ---------------------------------------------------------------------------- CPU shims
#
# Our tensor-parallel path (column/row linears, vocab embedding, vocab cross-entropy) runs on CPU
# as is. Two other megatron-core paths assume CUDA and are shimmed so that they work on CPU too:
# 1. Collectives that allocate their output (all-gather, reduce-scatter: gathering vocab-sharded
#    logits, sequence parallelism, GlobalMemoryBuffer) do so on `torch.cuda.current_device()`,
#    which raises without CUDA. The shim answers the CPU.
# 2. `CudaRNGStatesTracker` (behind `model_parallel_cuda_manual_seed` and
#    `get_cuda_rng_tracker().fork()`, which megatron uses for per-TP-rank randomness) stores CUDA
#    generator states. The shim is the same tracker over CPU generator states (it stays in place
#    unless `model_parallel_cuda_manual_seed(..., force_reset_rng=True)` replaces it).
# The device shim patches `torch.cuda.current_device` process-wide (megatron reads it through the
# `torch` module, so there is no narrower hook); with no CUDA it could only have raised.

_original_current_device: Callable[[], int] | None = None


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


class _CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron-core's named RNG streams (data-, tensor-, expert-parallel) over the CPU generator:
    ``fork(name)`` runs its body on stream ``name`` and then restores the default stream."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream {name!r} or seed {seed} already added")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _install_cpu_shims() -> None:
    global _original_current_device
    if _original_current_device is None:
        _original_current_device = torch.cuda.current_device
        torch.cuda.current_device = _cpu_current_device
    megatron_random._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _remove_cpu_shims() -> None:
    global _original_current_device
    if _original_current_device is not None:
        torch.cuda.current_device = _original_current_device
        _original_current_device = None
    if isinstance(megatron_random._CUDA_RNG_STATE_TRACKER, _CpuRNGStatesTracker):
        megatron_random._CUDA_RNG_STATE_TRACKER = None
        megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
