"""A 2-rank stage on a mixture with a video source, end to end: killed by SIGKILL mid-run, it
resumes and trains the steps it replays to the same losses; its visual tokens count real frames,
and its end-of-run evaluation scores clips: captions by CIDEr-D, answers by VQA accuracy.

No second uninterrupted run is launched: the killed run is its own reference. Every step it
logged after its latest checkpoint is trained again by the resumed run, from the restored model,
optimizer, data and RNG state, and must give the loss it gave the first time (1e-6)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pali3_train.data_pipeline.demo_corpus import build_demo_corpus
from pali3_train.engine.checkpoint import find_latest
from pali3_train.plots import read_metrics
from tests.engine.conftest import launch, stage_config
from tests.faults.cases import kill_job, losses, start, wait_for_step

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def video_demo(tmp_path_factory):
    """The tiny demo's image sources and its moving-shapes clips (8 frames, every 2nd read)."""
    return build_demo_corpus(tmp_path_factory.mktemp("video_demo"), samples_per_source=16,
                             samples_per_shard=8, image_size_px=32, vocab_size=1024,
                             video_samples=16)  # fmt: skip


def test_a_video_stage_killed_mid_run_resumes_to_the_same_losses(video_demo, tmp_path):
    clips = [dataclasses.asdict(s) for s in video_demo.video_sources()]
    sources = [*(dataclasses.asdict(s) for s in video_demo.sources()), *clips]
    run_dir = tmp_path / "run"
    # 5 frames: the clips' 4 real ones and one padded; images are one-frame clips
    config = stage_config(video_demo, run_dir, data={"sources": sources, "max_frames": 5},
                          train={"steps": STEPS}, checkpoint={"every_steps": EVERY},
                          eval={"sources": clips, "max_samples": 4, "batch_size": 2,
                                "max_decode_tokens": 8})  # fmt: skip
    process = start(config)
    wait_for_step(run_dir, process, EVERY + 1)
    kill_job(process)
    before = losses(run_dir)
    latest = find_latest(run_dir / "checkpoints")
    saved = int(latest.name.removeprefix("step_"))
    replayed = {step: loss for step, loss in before.items() if step > saved}
    assert replayed, f"killed at step {max(before)}, the latest checkpoint is {latest.name}"

    result = launch(config, 2, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step, loss in replayed.items():
        assert after[step] == pytest.approx(loss, abs=1e-6), f"step {step}"
    # Visual tokens per sample: 16 patches per image or real frame, so between an image's 16 and
    # a clip's 4 x 16 (its padded fifth frame not counted); above 16 where clips were drawn.
    rows = read_metrics(run_dir / "metrics.jsonl").values()
    per_sample = [row["visual_tokens_per_s"] / row["samples_per_s"] for row in rows]
    assert all(16 - 1e-9 <= n <= 64 + 1e-9 for n in per_sample) and max(per_sample) > 16, per_sample
    final = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert final["step"] == STEPS
    assert {k for k in final if k != "step"} == {
        "eval/clips_video_caption/cider", "eval/clips_video_caption/samples",
        "eval/clips_video_qa/vqa_accuracy", "eval/clips_video_qa/samples",
    }  # fmt: skip
    assert final["eval/clips_video_caption/samples"] == final["eval/clips_video_qa/samples"] == 4
