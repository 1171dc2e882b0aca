"""The dry-run plan (`pali3_train.engine.dry_run`): every paper-scale config plans for the world it
names, the stages chain through each other's exports, a bad freeze path is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pali3_train.config import ConfigError, load_config
from pali3_train.engine.dry_run import build_plan, format_plan
from tests.engine.conftest import ROOT

PALI3_5B = sorted((ROOT / "configs" / "pali3_5b").glob("*.yaml"))
GiB = 2**30


def _world_of(path: Path) -> int:
    """The world size a config's header says it is sized for (its dry-run command)."""
    found = re.search(r"--world-size (\d+)", path.read_text())
    assert found, f"{path.name}: the header names no --world-size"
    return int(found.group(1))


def test_the_paper_scale_configs_are_all_there():
    names = {p.name for p in PALI3_5B}
    assert names == {
        "stage0.yaml",
        "stage1.yaml",
        "stage2_812.yaml",
        "stage2_1064.yaml",
        "transfer_captioning.yaml",
        "transfer_vqa.yaml",
        "transfer_ocr.yaml",
        "transfer_video.yaml",
    }


@pytest.mark.parametrize("path", PALI3_5B, ids=lambda p: p.stem)
def test_each_paper_scale_config_validates_and_plans_for_its_world(path):
    cfg = load_config(path)
    stage, world = cfg.stage.name, _world_of(path)
    plan = build_plan(cfg, world, 8, str(path))

    assert cfg.parallel.zero_stage == 3 and cfg.train.precision == "bf16"
    assert plan.tp == 4 and plan.dp * plan.tp == world and world % 8 == 0
    assert plan.accumulation * cfg.train.micro_batch_size * plan.dp == cfg.train.global_batch_size
    assert cfg.model.vit.image_size_px % cfg.model.vit.patch_size_px == 0
    # Everything (model states, one micro-batch's activations) fits an 80 GB device with room.
    assert plan.states.total + plan.activation_bytes < 40 * GiB
    total = sum(m.total for m in plan.modules)
    if stage == "0":
        assert 2.4e9 < total < 2.7e9  # SigLIP: ViT-G + MAP head + text tower
        assert plan.accumulation == 1  # the sigmoid loss sees micro x DP pairs
        assert cfg.train.micro_batch_size * plan.dp == 32768
    else:
        assert total == pytest.approx(5.0e9, rel=0.01)
    frozen = "vit" in cfg.stage.freeze
    assert frozen == (stage in ("1", "transfer"))
    vit = next(m for m in plan.modules if m.name in ("vit", "image"))
    assert (vit.trainable == 0) == frozen
    text = format_plan(plan, "OK", "none")
    assert len(text.splitlines()) <= 40
    assert f"world {world} = TP 4 x DP {plan.dp}" in text


def test_the_video_config_plans_16_frames_of_tokens():
    """16 frames of 16 x 16 patches (224 px / 14): 4,096 visual tokens, read by the encoder with
    the 16 of the prompt."""
    path = ROOT / "configs/pali3_5b/transfer_video.yaml"
    text = format_plan(build_plan(load_config(path), 64, 8, str(path)), "OK", "none")
    assert "4,096 image + 16 prompt + 48 target = 4,160 per sample (16 frames at 224 px)" in text
    assert re.search(r"ul2 encoder .* 24 blocks, s=4,112, h=2048", text)


def test_the_stages_chain_through_each_others_exports():
    """Each stage.init_from is the model.safetensors of another config's run_dir, earlier in the
    curriculum, at the resolution the next stage starts from."""
    configs = {p.stem: load_config(p) for p in PALI3_5B}
    exports = {name: f"{cfg.run_dir}/model.safetensors" for name, cfg in configs.items()}
    expected = {
        "stage0": None,
        "stage1": "stage0",
        "stage2_812": "stage1",
        "stage2_1064": "stage2_812",
        "transfer_captioning": "stage2_812",
        "transfer_vqa": "stage2_812",
        "transfer_ocr": "stage2_1064",
        "transfer_video": "stage1",  # 16 frames at 224 px
    }
    for name, parent in expected.items():
        init = configs[name].stage.init_from
        assert init == (exports[parent] if parent else None), name
        if name.startswith("transfer"):  # transfers keep the resolution they start from
            assert configs[name].model.vit.image_size_px == configs[parent].model.vit.image_size_px
    assert configs["stage2_812"].model.vit.image_size_px == 812 == 58 * 14
    assert configs["stage2_1064"].model.vit.image_size_px == 1064 == 76 * 14
    assert (
        not configs["stage2_812"].stage.freeze
        and configs["stage2_812"].parallel.activation_checkpointing
    )


def test_a_bad_freeze_path_is_a_config_error():
    overrides = ["data.max_target_tokens=16", "stage.name=null", "stage.objective=contrastive"]
    cfg = load_config(ROOT / "configs/tiny/stage1.yaml", overrides)
    with pytest.raises(ConfigError, match="stage.freeze: ContrastiveSigLIP has no 'vit'"):
        build_plan(cfg, 2)
