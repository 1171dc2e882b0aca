"""The capacity planner (`cluster.plan`): its memory is the dry-run plan's and so DeepSpeed's own
estimate, its counts are the meta-device model's, its recommendation fits and factorises, and
requests nothing can meet are refused naming the option. Measured memory needs a GPU: not here."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from pali3_train.cluster.plan import Cluster, PlanError, main, recommend, search
from pali3_train.config import load_config
from pali3_train.engine.dry_run import build_plan
from pali3_train.engine.memory import local_numels
from pali3_train.models import PaLI3
from pali3_train.params import count, parameter_table
from pali3_train.stages.curriculum import CURRICULUM

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs/models/pali3_5b.yaml"
TINY = ROOT / "configs/models/tiny.yaml"
GiB = 2**30


def _preset(stage: str, *overrides: str):
    """The 5B preset as `--model` plans it: bf16, the curriculum's freezing, a 1024 batch."""
    return load_config(
        PRESET,
        [
            "train.precision=bf16",
            f"stage.name='{stage}'",
            f"stage.objective={CURRICULUM[stage].objective}",
            f"stage.freeze={list(CURRICULUM[stage].freeze)}",
            "train.micro_batch_size=1",
            "train.global_batch_size=1024",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def stage2():
    """Everything trains: what DeepSpeed's estimators assume."""
    return search(_preset("2"), Cluster(gpus=64, gpu_memory_gib=80), str(PRESET))


@pytest.fixture(scope="module")
def stage1():
    return search(_preset("1"), Cluster(gpus=64, gpu_memory_gib=80), str(PRESET))


def _layout(found, tp: int, zero: int):
    return next(x for x in found.layouts if (x.tp, x.zero, x.checkpointing) == (tp, zero, False))


def _meta_pali3(cfg) -> PaLI3:
    with torch.device("meta"):
        return PaLI3(cfg.model)


# ---------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("tp", [1, 4])
def test_model_states_are_deepspeeds_estimates_for_the_planned_counts(stage2, tp):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = _meta_pali3(stage2.cfg)
    local = local_numels(model, tp)  # what one TP rank holds (checked against a real TP model
    params = sum(local.values())  # in tests/engine/test_memory.py)
    largest = max(sum(local[id(p)] for p in m.parameters(recurse=False)) for m in model.modules())
    threshold = 10 * 2048  # ZeroConfig's rule, 10 x the widest tower (UL2's d_model 2048)
    persistent = sum(n for n in local.values() if n < threshold)
    dp = 64 // tp  # DeepSpeed's "GPUs" are the data-parallel ranks

    zero2 = _layout(stage2, tp, 2)
    assert (zero2.rank.params, zero2.rank.trainable, zero2.dp) == (params, params, dp)
    _, ds2 = estimate_zero2_model_states_mem_needs(params, dp, 1, cpu_offload=False)
    assert zero2.states.total == pytest.approx(ds2, abs=1)

    zero3 = _layout(stage2, tp, 3)
    assert zero3.rank.largest_layer == largest
    _, ds3, ds3_largest = estimate_zero3_model_states_mem_needs(
        params, largest, dp, 1, cpu_offload=False, cpu_offload_params=False
    )
    assert zero3.states.gathered == ds3_largest
    # Two documented differences from DeepSpeed's ZeRO-3 estimate (engine/plan.py): the 16-bit
    # gradient partition that stage 3 allocates (grad_partitions_flat_buffer), 2 bytes per
    # parameter over DP; and parameters under the persistence threshold, kept whole on every rank.
    extra = 2 * params / dp + 2 * persistent * (1 - 1 / dp)
    assert zero3.states.total - extra == pytest.approx(ds3, abs=1)


def test_parameter_counts_are_the_meta_devices(stage1, stage2):
    model = _meta_pali3(stage1.cfg)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.vit.parameters())
    table = {row.name: row.params for row in parameter_table(stage1.cfg.model)}
    assert total == table["PaLI-3 total"] == pytest.approx(5.0e9, rel=0.01)
    for found, trainable in ((stage1, total - frozen), (stage2, total)):
        assert sum(m.total for m in found.modules) == total
        assert sum(m.trainable for m in found.modules) == trainable
        whole = _layout(found, 1, 1).rank
        assert (whole.params, whole.trainable) == (total, trainable)
        assert total / 4 < _layout(found, 4, 1).rank.params < total / 3  # most of it is sharded


def test_flops_are_counted_per_tower_and_see_the_frozen_vit(stage1, stage2):
    """F is counted, not 6 x parameters x tokens: each tower sees its own tokens, a frozen tower
    with nothing trainable before it has no backward, and recompute is executed work (hardware
    FLOPs), which the step time is made of."""
    cfg, model = stage2.cfg, _meta_pali3(stage2.cfg)
    patches, prompt, target = cfg.model.vit.num_patches, 64, 64
    vit, ul2 = count(model.vit), model.ul2
    per_tower = 6 * (
        (vit + count(model.projection)) * patches
        + count(ul2.encoder_layers) * (patches + prompt)
        + (count(ul2.decoder_layers) + count(ul2.lm_head)) * target
    )
    everything = stage2.flops.model
    assert 1.0 < everything / per_tower < 1.1  # attention and cross-attention K/V on top
    assert 6 * count(model) * (patches + prompt + target) > 1.7 * everything  # the naive formula
    # Freezing the ViT saves its backward: input and weight gradients, 4 x parameters x patches.
    assert (everything - stage1.flops.model) / (4 * vit * patches) == pytest.approx(1, abs=0.05)
    # Checkpointing recomputes at most one forward (torch stops once backward has its inputs).
    for found in (stage1, stage2):
        assert found.flops.hardware(False) == found.flops.model
        assert 0 < found.flops.hardware(True) - found.flops.model < found.flops.model / 3
    for layout in (x for x in stage2.layouts if (x.tp, x.zero) == (1, 1)):
        step = stage2.flops.hardware(layout.checkpointing) * 1024 / (64 * 989.4e12 * 0.4)
        assert layout.step_s == pytest.approx(step)


# -------------------------------------------------------------------------- recommendation


def _snippet(text: str) -> dict:
    return yaml.safe_load(text[text.index("\ntrain:") :])


@pytest.mark.parametrize("which", ["stage1", "stage2"])
def test_the_recommendation_fits_factorises_and_is_what_the_dry_run_prints(which, request):
    from pali3_train.cluster.plan import format_report

    found = request.getfixturevalue(which)
    best = recommend(found)
    cfg, stage = found.cfg, found.cfg.stage.name
    assert best.required <= 80 * GiB
    assert best.micro * best.accumulation * best.dp == cfg.train.global_batch_size == 1024
    assert best.tp * best.dp == 64 and 8 % best.tp == 0
    for divisible in (cfg.model.vit.num_heads, cfg.model.ul2.num_heads, cfg.model.ul2.vocab_size):
        assert divisible % best.tp == 0
    assert best.step_s == min(x.step_s for x in found.fitting)
    assert all(x.required > 80 * GiB for x in found.layouts if x.order < best.order)

    text = format_report(found, best)
    assert len(text.splitlines()) <= 32
    fields = _snippet(text)
    assert fields["parallel"] == {
        "tensor_parallel_size": best.tp,
        "zero_stage": best.zero,
        "activation_checkpointing": best.checkpointing,
    }
    pasted = [f"{section}.{k}={v}" for section in fields for k, v in fields[section].items()]
    plan = build_plan(_preset(stage, *pasted), 64)
    assert plan.accumulation == best.accumulation
    assert plan.states == best.states and plan.activation_bytes == best.activations


def test_the_5b_video_config_plans_for_16_frames_of_256_tokens():
    """16 frames at 224 px: 4,096 visual tokens in the UL2 encoder (plus 16 of prompt), the
    frozen ViT run over 16 images a sample; the recommendation pasted back dry-runs alike."""
    from pali3_train.cluster.plan import format_report

    path = ROOT / "configs/pali3_5b/transfer_video.yaml"
    found = search(load_config(path), Cluster(gpus=64, gpu_memory_gib=80), str(path))
    best = recommend(found)
    assert best.required <= 80 * GiB
    text = format_report(found, best)
    assert "per sample 4,096 image tokens (256 a 224 px image or frame) + 16 prompt" in text
    pasted = [f"{section}.{k}={v}" for section, values in _snippet(text).items()
              for k, v in values.items()]  # fmt: skip
    plan = build_plan(load_config(path, pasted), 64)
    encoder = next(t for t in plan.activations.towers if t.name == "ul2 encoder")
    assert encoder.seq == 16 * 256 + 16
    assert plan.states == best.states and plan.activation_bytes == best.activations


# -------------------------------------------------------------------------------- refusals


def test_a_tiny_budget_is_refused_naming_gpu_memory(stage1, capsys):
    with pytest.raises(PlanError, match=r"^--gpu-memory: no layout fits 2.5 GiB .* needs 3\.\d"):
        recommend(replace(stage1, cluster=replace(stage1.cluster, gpu_memory_gib=2.5)))

    assert main(["--model", str(TINY), "--world-size", "8", "--gpu-memory", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-memory: no layout fits 0.5 GiB per GPU; the smallest")
    assert "--world-size" in err and "--image-size-px" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--world-size", "12"], "error: --gpus-per-node: --world-size 12 is not a whole number"),
        (["--world-size", "4"], "(one partial node: --gpus-per-node 4)"),
        (["--world-size", "16", "--global-batch", "10"], "error: --global-batch: no layout splits"),
    ],
)
def test_impossible_requests_are_refused_naming_the_option(args, message, capsys):
    assert main(["--model", str(TINY), "--gpu-memory", "80", *args]) == 2
    assert message in capsys.readouterr().err


def test_tp_sizes_the_model_cannot_split_are_left_out():
    """Tiny: 4 UL2 heads, so of a 12-GPU node's TP sizes 3, 6 and 12 are left out."""
    cfg = load_config(TINY, ["train.micro_batch_size=1", "train.global_batch_size=96"])
    found = search(cfg, Cluster(gpus=24, gpu_memory_gib=80, gpus_per_node=12))
    assert sorted({x.tp for x in found.layouts}) == [1, 2, 4]
    assert set(found.skipped) == {3, 6, 12}
    assert "not divisible by parallel.tensor_parallel_size=3" in found.skipped[3]


# -------------------------------------------------------------------------------------- CLI


def test_the_cli_recommends_a_layout_for_the_5b_preset_on_64_gpus():
    command = [sys.executable, "-m", "pali3_train.cluster.plan", "--model", str(PRESET)]
    command += ["--world-size", "64", "--gpu-memory", "80", "--global-batch", "1024"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "capacity plan: stage 1 of" in out and "on 64 GPUs (8 nodes x 8), 80 GiB each" in out
    assert "recommended: TP " in out
    fields = _snippet(out)
    train, parallel = fields["train"], fields["parallel"]
    assert train["global_batch_size"] == 1024 and train["precision"] == "bf16"
    assert 64 // parallel["tensor_parallel_size"] * train["micro_batch_size"] <= 1024
    assert parallel["zero_stage"] in (1, 2, 3)
