"""Pre-launch checks (`pali3_train.engine.checks`) against each objective's rules: SigLIP's
contrastive batch is never split by accumulation, settings an objective ignores are named,
``--stage`` must agree with the config; the launcher refuses all of it before any rank starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pali3_train.config import ConfigError, load_config
from pali3_train.engine.checks import check_layout, check_stage_flag
from tests.engine.conftest import ROOT, launch_env

STAGE0 = ROOT / "configs/tiny/stage0.yaml"  # global 32 = micro 16 x DP 2
STAGE1 = ROOT / "configs/tiny/stage1.yaml"


def test_contrastive_accumulation_is_refused_naming_the_micro_batch_to_use():
    cfg = load_config(STAGE0)
    assert check_layout(cfg, 2, "s0.yaml") == (1, [])
    with pytest.raises(ConfigError) as refused:
        check_layout(cfg, 1, "s0.yaml")  # DP 1: accumulation 2 would halve the pairs
    message = str(refused.value)
    assert message.startswith("s0.yaml: train.micro_batch_size: 16 x accumulation 2 x DP 1")
    assert "16 pairs at a time, not 32" in message and "global / DP = 32" in message
    assert check_layout(load_config(STAGE1), 1, "s1.yaml")[0] == 2  # generative: accumulates


def test_settings_the_contrastive_objective_ignores_are_named():
    cfg = load_config(STAGE0, ["data.max_prompt_tokens=8", "eval.beam_size=4"])
    _, warnings = check_layout(cfg, 2, "s0.yaml")
    assert warnings == [
        "data.max_prompt_tokens=8 is ignored by the contrastive objective: prompts are not fed to "
        "the model",
        "eval.beam_size=4 is ignored by the contrastive objective: nothing is decoded",
    ]


def test_contrastive_texts_must_fit_the_text_tower():
    cfg = load_config(STAGE0, ["data.max_target_tokens=17"])
    with pytest.raises(ConfigError, match="data.max_target_tokens: 17 exceeds the text tower's"):
        check_layout(cfg, 2, "s0.yaml")


def test_a_video_source_is_refused_for_the_contrastive_objective():
    clips = "data.sources=[{name: clips, shards: c.tar, task: video_caption, frame_stride_s: 1}]"
    cfg = load_config(STAGE0, [clips])
    with pytest.raises(ConfigError, match="data.sources: video tasks train PaLI-3"):
        check_layout(cfg, 2, "s0.yaml")


def test_a_video_eval_source_is_refused_for_the_contrastive_objective():
    """Before the first evaluation, not at it (a clip would reach the image tower's conv)."""
    clips = ("eval.sources=[{name: digits_caption, shards: h.tar, task: caption}, "
             "{name: clips, shards: c.tar, task: video_qa, frame_stride_frames: 2}]")  # fmt: skip
    cfg = load_config(STAGE0, [clips])
    with pytest.raises(ConfigError) as refused:
        check_layout(cfg, 2, "s0.yaml")
    message = str(refused.value)
    assert "eval.sources[1].task: video_qa is evaluated by PaLI-3" in message
    assert len(message.splitlines()) == 1


def test_zero_shot_evaluation_is_refused_for_the_generative_objective():
    classes = "eval.zero_shot=[{source: scenes_caption, classes: [red, blue]}]"
    cfg = load_config(STAGE1, [classes])
    with pytest.raises(ConfigError, match="eval.zero_shot: zero-shot classification scores"):
        check_layout(cfg, 2, "s1.yaml")


def test_the_stage_flag_must_agree_with_the_config():
    named, anonymous = load_config(STAGE1), load_config(STAGE1, ["stage.name=null"])
    check_stage_flag(named, "1", "s1.yaml")
    check_stage_flag(named, None, "s1.yaml")
    check_stage_flag(anonymous, "transfer", "s1.yaml")  # same objective, the config names none
    with pytest.raises(ConfigError, match="stage.name: is '1', but --stage 2 was given"):
        check_stage_flag(named, "2", "s1.yaml")
    with pytest.raises(ConfigError, match="stage.objective: is 'generative', but --stage 0"):
        check_stage_flag(anonymous, "0", "s1.yaml")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launcher/run.py"), *args],
                          capture_output=True, text=True, env=launch_env(), cwd=ROOT,
                          timeout=120)  # fmt: skip


def test_the_launcher_refuses_a_stage_mismatch_a_split_contrastive_batch_and_cpu_flex():
    mismatch = _run("--stage", "0", "--config", str(STAGE1))
    split = _run("--config", str(STAGE0), "--set", "train.micro_batch_size=8")
    flex = _run("--config", str(STAGE1), "--set", "kernels.attention=flex")  # no CPU backward
    for result, source, field in (  # the file or --set item that gave the value at fault
        (mismatch, str(STAGE1), "stage.name"),
        (split, "--set train.micro_batch_size=8", "train.micro_batch_size"),
        (flex, "--set kernels.attention=flex", "kernels.attention"),
    ):
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.startswith(f"error: {source}: {field}: "), result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_an_evaluation_needs_no_whole_batch():
    """--eval-only takes no optimizer step: a stage-0 model can be scored on any world size."""
    assert check_layout(load_config(STAGE0), 1, "s0.yaml", training=False)[0] == 2


def test_the_stage_flag_names_an_unnamed_config():
    anonymous = load_config(STAGE1, ["stage.name=null"])
    assert check_stage_flag(anonymous, "transfer", "s1.yaml").stage.name == "transfer"
    assert check_stage_flag(anonymous, None, "s1.yaml") is anonymous
