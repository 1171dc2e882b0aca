"""ZeRO-3 partitioned construction (``engine/zero_init.py``, through ``engine.build.build_model``)
on 2 real gloo ranks: each rank holds half of the model, and the weights gathered back equal a
single process's unpartitioned build with the same seed, for both objectives, in bf16, under
tensor parallelism, and after ``init_from`` weights were loaded into the partitions (renamed from
a SigLIP file, position embeddings resampled)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pali3_train.config import config_from_dict, load_config, to_dict
from pali3_train.convert.safetensors_io import save_weights
from pali3_train.engine.distributed import DistEnv, free_port, init_distributed
from pali3_train.models import SigLIP
from pali3_train.stages.registry import spec_for

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _config(init_from: str | None = None, **sections):
    model = to_dict(load_config(ROOT / "configs/models/tiny.yaml").model)
    model["vit"] |= sections.pop("vit", {})
    model |= sections.pop("model", {})
    return config_from_dict(
        {
            "model": model,
            "train": {"global_batch_size": 4, "micro_batch_size": 2, "seed": 3}
            | sections.pop("train", {}),
            "parallel": {"zero_stage": 3} | sections.pop("parallel", {}),
            "stage": {"init_from": init_from} | sections.pop("stage", {}),
            **sections,
        }
    )


def _scenarios(siglip_file: str) -> dict:
    return {
        "generative": _config(model={"temporal_embedding": True}),  # its table too
        "contrastive": _config(stage={"objective": "contrastive"}),
        # a stage-2-like start: 48 px (6x6 patches) from a 32 px SigLIP file, ViT frozen, bf16
        "bf16 from siglip": _config(
            siglip_file,
            vit={"image_size_px": 48},
            train={"precision": "bf16"},
            stage={"freeze": ["vit"]},
        ),
        "tp2": _config(parallel={"tensor_parallel_size": 2}),
    }


def _build_rank(rank: int, port: int, siglip_file: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(DistEnv(rank, WORLD, rank))
    import deepspeed

    from pali3_train.engine.build import build_model
    from pali3_train.parallel import (
        ParallelDims,
        destroy_model_parallel,
        full_state_dict,
        init_model_parallel,
    )

    results = {}
    for name, cfg in _scenarios(siglip_file).items():
        dims = ParallelDims(WORLD, cfg.parallel.tensor_parallel_size)
        init_model_parallel(dims)
        model = build_model(cfg, dims)
        params = list(model.parameters())
        partitioned = all(hasattr(p, "ds_id") for p in params)
        held = sum(p.ds_tensor.numel() for p in params) if partitioned else None
        with deepspeed.zero.GatheredParameters(params):
            dtypes = {n: p.dtype for n, p in model.named_parameters()}
            weights = full_state_dict(model)  # fp32, TP shards concatenated
        results[name] = {
            "partitioned": partitioned,
            "held": held,
            "whole": sum(p.ds_numel for p in params) if partitioned else None,
            "count": len(params),
            "dtypes": dtypes,
            "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
            "weights": weights,
        }
        destroy_model_parallel()
    torch.save(results, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _reference(name: str, cfg, siglip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One process, no process group, no DeepSpeed: the spec's model built whole with the
    seed; for the init_from scenario its ViT replaced by the SigLIP file's image tower, the 4x4
    position-embedding grid interpolated bilinearly to 6x6."""
    torch.manual_seed(cfg.train.seed)
    state = spec_for(cfg).build_model(cfg.model).state_dict()
    if name == "bf16 from siglip":
        for key, value in siglip.items():
            if key.startswith("image."):
                state["vit." + key.removeprefix("image.")] = value
        grid = siglip["image.pos_embed"].T.reshape(1, -1, 4, 4)
        resized = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
        state["vit.pos_embed"] = resized.reshape(-1, 36).T
        state = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    return state


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_init")
    torch.manual_seed(5)
    siglip = SigLIP(_config().model).state_dict()
    save_weights(siglip, root / "stage0.safetensors", {"kind": "siglip"})
    mp.start_processes(
        _build_rank,
        (free_port(), str(root / "stage0.safetensors"), str(root)),
        nprocs=WORLD,
        start_method="spawn",
    )
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, siglip, _scenarios(str(root / "stage0.safetensors"))


@pytest.mark.parametrize("name", ["generative", "contrastive", "bf16 from siglip", "tp2"])
def test_the_partitioned_build_equals_the_unpartitioned_one(built, name):
    ranks, siglip, scenarios = built
    expected = _reference(name, scenarios[name], siglip)
    for rank in ranks:
        got = rank[name]
        assert got["partitioned"], "every parameter is a ZeRO-3 partition from construction on"
        assert sorted(got["weights"]) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(got["weights"][key], value), key


def test_each_rank_holds_half_of_the_model(built):
    ranks, _, _ = built
    for rank in ranks:
        got = rank["generative"]
        # each parameter is padded to a multiple of the world size: at most one element per rank
        assert got["whole"] / WORLD <= got["held"] <= got["whole"] / WORLD + got["count"]


def test_precision_and_freezing_apply_to_the_partitions(built):
    ranks, _, _ = built
    got = ranks[0]["bf16 from siglip"]
    assert set(got["dtypes"].values()) == {torch.bfloat16}
    assert set(ranks[0]["generative"]["dtypes"].values()) == {torch.float32}
    frozen = {n for n, trains in got["trainable"].items() if not trains}
    assert frozen == {n for n in got["trainable"] if n.startswith("vit.")}
