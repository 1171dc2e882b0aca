"""The memory model (`pali3_train.engine.memory` and each spec's activations): the model-state
bytes agree with DeepSpeed's own estimators, the per-rank counts with a real tensor-parallel model,
the activations with a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pali3_train.config import ConfigError, load_config
from pali3_train.engine.memory import local_numels, model_states, rank_params
from pali3_train.models import PaLI3
from pali3_train.stages.registry import spec_for, stage_model
from tests.engine.conftest import ROOT

# ------------------------------------------------------------------------- model states


def _pali3_5b_counts() -> tuple[int, int]:
    """(parameters, largest layer) of PaLI-3 5B without TP, from the plan itself."""
    cfg = load_config(
        ROOT / "configs/pali3_5b/stage2_812.yaml", ["parallel.tensor_parallel_size=1"]
    )
    rank = rank_params(stage_model(cfg, "t"), 1, 0, "t")
    assert rank.params == rank.trainable  # stage 2 trains everything
    return rank.params, rank.largest_layer


@pytest.mark.parametrize("nodes", [1, 4, 32])
def test_model_states_are_deepspeeds_estimate_for_an_all_trainable_bf16_model(nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest = _pali3_5b_counts()
    gpus = 8 * nodes
    _, ds2 = estimate_zero2_model_states_mem_needs(params, 8, nodes, cpu_offload=False)
    ours2 = model_states(params, params, largest, gpus, 2, "bf16")
    assert ours2.total == pytest.approx(ds2, abs=1)

    _, ds3, ds3_largest = estimate_zero3_model_states_mem_needs(
        params, largest, 8, nodes, cpu_offload=False, cpu_offload_params=False
    )
    ours3 = model_states(params, params, largest, gpus, 3, "bf16")
    assert ours3.gathered == ds3_largest
    # DeepSpeed's ZeRO-3 estimate leaves out the 16-bit gradient partition that stage 3 allocates
    # (grad_partitions_flat_buffer); we count it: 2 bytes per parameter, partitioned.
    assert ours3.total - 2 * params / gpus == pytest.approx(ds3, abs=1)


def test_model_states_for_frozen_parameters_by_hand():
    """1000 parameters, 600 trainable, 4 data-parallel ranks."""
    p, t, dp = 1000, 600, 4
    assert model_states(p, t, 50, dp, 0, "fp32") == (4 * p, 4 * t, 8 * t, 0)
    assert model_states(p, t, 50, dp, 0, "bf16") == (2 * p, 2 * t, 16 * t, 0)
    assert model_states(p, t, 50, dp, 1, "fp32") == (4 * p, 4 * t, 16 * t / dp, 0)
    assert model_states(p, t, 50, dp, 2, "bf16") == (2 * p, 2 * t / dp, 16 * t / dp, 0)
    # ZeRO-3 partitions frozen weights too, except the small ones it keeps whole.
    assert model_states(p, t, 50, dp, 3, "bf16", persistent=40) == (
        2 * (40 + 960 / dp),
        2 * t / dp,
        16 * t / dp,
        2 * 2 * 50,
    )


def test_counts_match_deepspeeds_model_to_params():
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = load_config(ROOT / "configs/models/tiny.yaml")
    model = PaLI3(cfg.model)  # real weights: model_to_params tells parameters apart by address
    total, largest = model_to_params(model)
    rank = rank_params(model, 1, 0, "t")
    assert (rank.params, rank.largest_layer) == (total, largest)


def _count_a_real_tp_rank(dims, out: str) -> None:
    """On each rank: the tiny PaLI-3 with its ViT frozen, parallelized; rank 0 writes what one
    rank holds."""
    from pali3_train.engine.optim import freeze
    from pali3_train.parallel import parallelize

    torch.manual_seed(0)
    model = PaLI3(load_config(ROOT / "configs/models/tiny.yaml").model)
    freeze(model, ("vit",))
    parallelize(model, dims)
    params = list(model.parameters())
    counts = {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "largest_layer": max(
            sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
        ),
    }
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(counts))


def test_per_rank_counts_match_a_real_tensor_parallel_model(tmp_path):
    from tests.parallel.helpers import run_on_ranks

    out = tmp_path / "counts.json"
    run_on_ranks(_count_a_real_tp_rank, 2, 2, str(out))
    real = json.loads(out.read_text())

    cfg = load_config(ROOT / "configs/tiny/stage1.yaml", ["parallel.tensor_parallel_size=2"])
    rank = rank_params(stage_model(cfg, "t"), 2, 0, "t")
    assert rank.params == real["params"]
    assert rank.trainable == real["trainable"]
    assert rank.largest_layer == real["largest_layer"]
    whole = sum(p.numel() for p in stage_model(cfg, "t").parameters())
    assert whole / 2 < rank.params < whole  # most is sharded, norms and the projection are not


def test_a_layer_that_tp_cannot_split_is_named():
    cfg = load_config(ROOT / "configs/models/tiny.yaml")
    with torch.device("meta"):
        model = PaLI3(cfg.model)
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel_size: .*not divisible by"):
        local_numels(model, 3)


# -------------------------------------------------------------------------- activations


def test_activations_by_hand_for_the_tiny_stage1(tmp_path):
    """Tiny preset, fp32, TP 1, micro-batch 8: 16 patches + 24 prompt tokens into 2 encoder
    blocks of width 64 (4 heads), 24 target tokens through 2 decoder blocks, vocabulary 1024;
    the cross-entropy over all logits at once."""
    cfg = load_config(
        ROOT / "configs/tiny/stage1.yaml",
        ["train.micro_batch_size=8", "kernels.cross_entropy=plain"],
    )
    act = spec_for(cfg).activations(cfg, stage_model(cfg, "t"))
    b, w, h = 8, 4, 64
    block = lambda s: s * b * h * (10 + 24) * w / 2  # noqa: E731
    vit, encoder, decoder = act.towers
    assert vit.plain == vit.checkpointed == 0  # frozen and nothing trains before it
    bias = b * 4 * 40**2 * w
    assert encoder.plain == 2 * block(40) + bias
    assert encoder.checkpointed == 2 * w * 40 * b * h + bias
    cross_kv = 2 * 2 * b * 40 * 64 * w  # 2 layers x (K, V) of the encoder output
    assert decoder.plain == 2 * block(24) + cross_kv
    assert act.logits == b * 24 * 1024 * 12 and act.loss_path == "plain"
    assert act.total(False) == encoder.plain + decoder.plain + act.logits
    assert act.total(True) == encoder.checkpointed + decoder.checkpointed + block(40) + act.logits

    unfrozen = load_config(
        ROOT / "configs/tiny/stage1.yaml", ["train.micro_batch_size=8", "stage.freeze=[]"]
    )
    vit = spec_for(unfrozen).activations(unfrozen, stage_model(unfrozen, "t")).towers[0]
    assert vit.plain == 2 * block(16)


def test_activations_by_hand_for_a_tiny_video_stage():
    """The tiny stage 1 with a video source of 4 frames, ViT trained: the ViT runs over 4 x 8
    images of 16 patches, the encoder reads 4 x 16 patches + 24 prompt tokens."""
    cfg = load_config(
        ROOT / "configs/tiny/stage1.yaml",
        ["train.micro_batch_size=8", "kernels.cross_entropy=plain", "stage.freeze=[]",
         "data.max_frames=4", "data.sources=[{name: clips, shards: clips.tar, "
         "task: video_qa, frame_stride_s: 0.5}]"],
    )  # fmt: skip
    vit, encoder, _ = spec_for(cfg).activations(cfg, stage_model(cfg, "t")).towers
    w, h, seq = 4, 64, 4 * 16 + 24
    block = lambda s, b: s * b * h * (10 + 24) * w / 2  # noqa: E731
    assert vit.plain == 2 * block(16, 4 * 8)
    assert vit.checkpointed == 2 * w * 16 * 4 * 8 * h
    assert encoder.seq == seq
    assert encoder.plain == 2 * block(seq, 8) + 8 * 4 * seq**2 * w


@pytest.mark.parametrize(
    ("overrides", "path", "expected"),
    [
        # 192 tokens, vocabulary 1024 / TP, width 64, fp32: one 64-token chunk of logits at 12 B
        # a logit, and two more head gradients (1024 / TP x 64 x 4 B each).
        (["kernels.cross_entropy_chunk_tokens=64"], "chunked", 64 * 1024 * 12 + 2 * 1024 * 64 * 4),
        (
            ["kernels.cross_entropy_chunk_tokens=64", "parallel.tensor_parallel_size=2"],
            "chunked",
            64 * 512 * 12 + 2 * 512 * 64 * 4,
        ),
        (["kernels.cross_entropy_chunk_tokens=192"], "chunked", 192 * 1024 * 12),  # one chunk
        # the fp32 input gradient and a chunk of logits of about as many elements
        (["kernels.cross_entropy=liger"], "liger", 2 * 4 * 192 * 64),
        # the fp32 input gradient and one 64-token chunk of fp32 logits
        (
            ["kernels.cross_entropy=fused", "kernels.cross_entropy_chunk_tokens=64"],
            "fused",
            4 * 192 * 64 + 4 * 64 * 1024,
        ),
        # bf16: the head gradient's fp32 accumulator, a bf16 input gradient, 6 B a chunk logit
        (
            [
                "kernels.cross_entropy=fused",
                "kernels.cross_entropy_chunk_tokens=64",
                "train.precision=bf16",
            ],
            "fused",
            4 * 1024 * 64 + 2 * 192 * 64 + 6 * 64 * 1024,
        ),  # fmt: skip
        # bf16: the head gradient's fp32 accumulator too
        (
            ["kernels.cross_entropy=liger", "train.precision=bf16"],
            "liger",
            4 * 1024 * 64 + 2 * 2 * 192 * 64,
        ),
    ],
)
def test_the_loss_term_follows_the_cross_entropy_path(overrides, path, expected):
    """What the dry run counts for the loss is what the chosen path holds (a plan is for GPUs:
    auto takes liger at TP 1 below ZeRO-3, chunked otherwise)."""
    base = ["train.micro_batch_size=8", "kernels.cross_entropy=chunked"]
    cfg = load_config(ROOT / "configs/tiny/stage1.yaml", base + overrides)
    act = spec_for(cfg).activations(cfg, stage_model(cfg, "t"))
    assert act.loss_path == path and act.logits == expected
