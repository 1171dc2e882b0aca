"""Compiled blocks against the plain (eager) path, on the tiny stage 1: identical blocks compile
once per block type, gradients and checkpointing's recomputation are unchanged, evaluation and
generation stay eager; and under DeepSpeed on 2 real ranks (ZeRO-2 over 2 data-parallel ranks;
TP=2 with ZeRO-3 and activation checkpointing) the same per-step losses and weights as the eager
engine within 1e-5 (fp32).

Compiling costs seconds per graph on 2 cores (inductor's C++ build, once per rank), so every
case uses the tiny preset and the parity test's 3 steps, and the distributed cases share one
launch."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import pali3_train.parallel.compile as compile_module
from pali3_train.config import config_from_dict, to_dict
from pali3_train.engine.build import build_model, make_engine
from pali3_train.engine.deepspeed_config import accumulation_steps
from pali3_train.engine.distributed import DistEnv, free_port, init_distributed
from pali3_train.parallel import (
    ParallelDims,
    apply_activation_checkpointing,
    destroy_model_parallel,
    dp_rank,
    init_model_parallel,
)
from pali3_train.parallel.compile import compile_blocks
from pali3_train.stages.registry import spec_for
from tests.engine.test_parity import STEPS, _micro_batch
from tests.engine.test_parity import _config as parity_config
from tests.parallel.helpers import pali3_batch, tiny_pali3

TOL = {"atol": 1e-5, "rtol": 0}


# Inductor builds its C++ kernels in a pool of worker processes, each importing torch: on two
# cores shared by several ranks that costs more than it saves. One thread builds them in-process.
COMPILE_THREADS = 1


@pytest.fixture
def fresh_dynamo():
    """No graph compiled by an earlier test counts, and none is left for later ones. One torch
    thread, as in each rank below: the kernels inductor builds depend on it, and so the ranks
    find this process's kernels in inductor's on-disk cache."""
    torch.compiler.reset()
    counters.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with inductor_config.patch(compile_threads=COMPILE_THREADS):
            yield counters
    finally:
        torch.set_num_threads(threads)
        torch.compiler.reset()


def _config(tp: int, zero: int, checkpointing: bool, compiled: bool):
    """The parity test's tiny stage 1 (frozen ViT), with checkpointing and compile as given."""
    raw = to_dict(parity_config(tp, zero, "1"))
    raw["parallel"]["activation_checkpointing"] = checkpointing
    raw["kernels"]["compile"] = "on" if compiled else "off"
    return config_from_dict(raw)


def _count_compiled_calls(monkeypatch) -> list[int]:
    """Calls of a compiled block forward (what torch.compile returned)."""
    calls = [0]
    compiled = compile_module._compiled_function

    def counting(forward):
        def call(*args, **kwargs):
            calls[0] += 1
            return compiled(forward)(*args, **kwargs)

        return call

    monkeypatch.setattr(compile_module, "_compiled_function", counting)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_blocks_compile_once_per_type_and_match_eager(fresh_dynamo, monkeypatch, checkpointing):
    """Built as a run builds it (``build_model``, one process): the same batch as the
    distributed ZeRO-2 case below, whose ranks then find these graphs in inductor's cache."""
    dims = ParallelDims(1, 1)
    plain = build_model(_config(1, 2, False, False), dims)
    cfg = _config(1, 2, checkpointing, True)
    model = build_model(cfg, dims)
    assert list(model.state_dict()) == list(plain.state_dict())
    calls = _count_compiled_calls(monkeypatch)
    for step in range(2):
        for m in (plain, model):
            spec_for(cfg).loss(m, _micro_batch(step, 0, cfg)).backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        if p.grad is None:  # the frozen ViT
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
    # Per step: 2 ViT blocks, 2 UL2 encoder and 2 decoder layers; checkpointing runs the UL2
    # layers again in the backward pass (the frozen ViT records nothing to recompute).
    assert calls[0] == 2 * (6 + 4 * checkpointing)
    # One graph per block type, shared by both layers of each (and by checkpointing's reruns).
    assert fresh_dynamo["stats"]["unique_graphs"] == 3, dict(fresh_dynamo["stats"])
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    clone = copy.deepcopy(model)  # a copy runs its own blocks
    block = clone.ul2.decoder_layers[0]
    assert vars(block)["inner_forward" if checkpointing else "forward"].__self__ is block


def test_evaluation_and_cached_generation_run_eagerly(fresh_dynamo):
    plain = tiny_pali3().eval()
    model = compile_blocks(apply_activation_checkpointing(copy.deepcopy(plain)))
    images, prompt, prompt_mask, _, _ = pali3_batch(plain.cfg)
    with torch.no_grad():
        torch.testing.assert_close(model.vit(images), plain.vit(images), **TOL)
    for use_cache in (True, False):
        args = (images, prompt, prompt_mask, 5, 2, use_cache)
        assert torch.equal(model.generate(*args), plain.generate(*args))
    assert not fresh_dynamo["frames"], "nothing is compiled outside training"


# --------------------------------------------------------------- DeepSpeed on 2 real ranks

# (label, tensor parallel size, ZeRO stage, activation checkpointing)
# ZeRO-2 compiles whole blocks; TP=2 x ZeRO-3 with checkpointing is the 5B recipes' layout, where
# ZeRO-3's hooks and megatron-core's layers break each block into pieces (``parallel/compile.py``).
# ZeRO-3 partitions even over one data-parallel rank: its hooks gather and release every layer.
CASES = [
    ("zero2-dp2", 1, 2, False),
    ("tp2-zero3-checkpointing", 2, 3, True),
]
WORLD = 2


def _train(cfg, dims: ParallelDims) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses (mean over every rank's micro-batches) and this rank's weights after."""
    import deepspeed

    engine = make_engine(cfg, build_model(cfg, dims), dims)
    accum = accumulation_steps(cfg, dims.dp)
    losses = []
    for step in range(STEPS):
        total = torch.zeros(1)
        for micro in range(accum):
            batch = _micro_batch(step, dp_rank() * accum + micro, cfg)
            loss = spec_for(cfg).loss(engine, batch)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        losses.append(total.item() / (accum * dims.world_size))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.parallel.zero_stage == 3):
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return losses, weights


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    inductor_config.compile_threads = COMPILE_THREADS
    init_distributed(DistEnv(rank, WORLD, rank))
    results = {}
    for label, tp, zero, checkpointing in CASES:
        dims = ParallelDims(WORLD, tp)
        init_model_parallel(dims)
        eager_losses, eager = _train(_config(tp, zero, checkpointing, False), dims)
        counters.clear()
        losses, weights = _train(_config(tp, zero, checkpointing, True), dims)
        weight_error = max((weights[n] - w).abs().max().item() for n, w in eager.items())
        results[label] = {
            "eager": eager_losses,
            "compiled": losses,
            "weight_error": weight_error,
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        }
        destroy_model_parallel()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("compile")
    mp.start_processes(_rank, (free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(WORLD)]
    return {label: [results[label] for results in ranks] for label, *_ in CASES}


@pytest.mark.parametrize("label", [case[0] for case in CASES])
def test_compiled_engine_matches_eager_engine(distributed, label):
    for rank, result in enumerate(distributed[label]):
        assert result["compiled"] == pytest.approx(result["eager"], abs=1e-5), (rank, result)
        assert result["weight_error"] <= 1e-5, (rank, result)
        assert result["graphs"] > 0, "nothing was compiled"
    assert distributed[label][0]["eager"][-1] < distributed[label][0]["eager"][0]


def test_zero2_compiles_one_graph_per_block_type(distributed):
    """2 layers of each of the ViT's (frozen), UL2 encoder's and decoder's block: 3 graphs, and
    no graph breaks: without ZeRO-3's per-layer hooks a block compiles whole."""
    results = distributed["zero2-dp2"]
    assert [(r["graphs"], r["graph_breaks"]) for r in results] == [(3, 0)] * WORLD
