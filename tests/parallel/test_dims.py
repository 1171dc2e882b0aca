"""The parallel layout: ParallelDims validation, megatron-core's groups for TP=2 x DP=2 on four
real ranks as our helpers and DeepSpeedMPU report them, and the CPU shims."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from pali3_train.parallel import (
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
from tests.parallel.helpers import free_port, run_on_ranks

# ------------------------------------------------------------------------------- ParallelDims


def test_dims_split_the_world():
    dims = ParallelDims(world_size=8, tp=2)
    assert (dims.tp, dims.dp) == (2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.tp = 4


@pytest.mark.parametrize(
    "world,tp,message",
    [(4, 3, "3 does not divide world size 4"), (2, 0, "must be >= 1"), (0, 1, "must be >= 1")],
)
def test_dims_refuse_impossible_layouts(world, tp, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(world_size=world, tp=tp)


def test_model_parallel_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("another test left torch.distributed initialised in this process")
    with pytest.raises(RuntimeError, match="initialise torch.distributed"):
        init_model_parallel(ParallelDims(world_size=2, tp=2))


# ------------------------------------------------------------------------- four real ranks

MPU_GROUPS = [
    "get_model_parallel_group",
    "get_tensor_model_parallel_group",
    "get_data_parallel_group",
    "get_pipeline_model_parallel_group",
]
MPU_VALUES = [
    "get_model_parallel_rank",
    "get_model_parallel_world_size",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_src_rank",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_data_parallel_group_ranks",
    "get_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_world_size",
]


def _layout(dims: ParallelDims, out: str) -> None:
    mpu = DeepSpeedMPU()
    rank = dist.get_rank()
    record = {
        "helpers": (tp_rank(), dp_rank(), dp_size()),
        "tp_members": dist.get_process_group_ranks(tp_group()),
        "dp_members": dist.get_process_group_ranks(dp_group()),
        "mpu": {name: getattr(mpu, name)() for name in MPU_VALUES},
        "mpu_groups": {n: dist.get_process_group_ranks(getattr(mpu, n)()) for n in MPU_GROUPS},
        # Shim 1: megatron allocates the all-gather output on torch.cuda.current_device().
        "gathered": tensor_parallel.gather_from_tensor_model_parallel_region(
            torch.full((1, 2), float(rank))
        ),
        **_rng_streams(),
    }
    destroy_model_parallel()
    try:
        torch.cuda.current_device()
        record["shim_removed"] = False
    except (AssertionError, RuntimeError):
        record["shim_removed"] = True
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if rank == 0:
        torch.save(records, out)


def _rng_streams() -> dict:
    """Shim 2: megatron's per-TP-rank RNG stream on the CPU generator."""
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        in_tp_stream = torch.rand(3)
    return {"tp_stream": in_tp_stream, "default_stream": torch.rand(3)}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("layout") / "layout.pt"
    run_on_ranks(_layout, 4, 2, str(out))
    return torch.load(out)


def test_tp_groups_are_consecutive_ranks_and_dp_groups_hold_the_same_shard(layout):
    for rank, record in enumerate(layout):
        tp, dp = rank % 2, rank // 2
        assert record["helpers"] == (tp, dp, 2)
        assert record["tp_members"] == [2 * dp, 2 * dp + 1]
        assert record["dp_members"] == [tp, tp + 2]


def test_deepspeed_mpu_reports_tensor_parallel_as_model_parallel(layout):
    for rank, record in enumerate(layout):
        tp, dp = rank % 2, rank // 2
        assert record["mpu"] == {
            "get_model_parallel_rank": tp,
            "get_model_parallel_world_size": 2,
            "get_tensor_model_parallel_rank": tp,
            "get_tensor_model_parallel_world_size": 2,
            "get_tensor_model_parallel_src_rank": 2 * dp,
            "get_data_parallel_rank": dp,
            "get_data_parallel_world_size": 2,
            "get_data_parallel_group_ranks": [tp, tp + 2],
            "get_pipeline_model_parallel_rank": 0,
            "get_pipeline_model_parallel_world_size": 1,
        }
        groups = record["mpu_groups"]
        assert groups["get_model_parallel_group"] == record["tp_members"]
        assert groups["get_tensor_model_parallel_group"] == record["tp_members"]
        assert groups["get_data_parallel_group"] == record["dp_members"]
        assert groups["get_pipeline_model_parallel_group"] == [rank]


def test_deepspeed_mpu_does_not_claim_sequence_parallelism():
    # DeepSpeed switches to Ulysses sequence parallelism when this method exists.
    assert not hasattr(DeepSpeedMPU(), "initialize_sequence_parallel")


def test_cpu_shims_let_megatron_gather_and_fork_rng_streams(layout):
    for record in layout:
        first, second = (float(r) for r in record["tp_members"])
        assert record["gathered"].tolist() == [[first, first, second, second]]
        assert record["shim_removed"], "destroy_model_parallel removes the device shim"
    streams = [record["tp_stream"] for record in layout]
    assert not torch.equal(streams[0], streams[1]), "TP ranks draw different numbers"
    assert torch.equal(streams[0], streams[2]) and torch.equal(streams[1], streams[3]), (
        "DP replicas of a shard draw the same numbers"
    )
    untouched = torch.rand(3, generator=torch.Generator().manual_seed(0))
    for record in layout:
        assert torch.equal(record["default_stream"], untouched), "fork leaves the default stream"


def _nothing(dims: ParallelDims) -> None:
    pass


def test_ranks_forked_after_a_one_rank_run_in_this_process_start(tmp_path):
    """destroy_model_parallel must drop every group: one that megatron-core 0.16.1 keeps would be
    inherited by forked ranks and hang or crash their initialize_model_parallel."""
    if dist.is_initialized():
        pytest.skip("another test left torch.distributed initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        init_model_parallel(ParallelDims(world_size=1, tp=1))
        destroy_model_parallel()
    finally:
        dist.destroy_process_group()
    run_on_ranks(_nothing, 2, 2)
