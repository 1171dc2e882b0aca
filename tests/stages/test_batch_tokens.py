"""Tokens a batch feeds the model, split as the trainer logs them: visual (every image's patches)
and text (real tokens only: prompt and target for PaLI-3, the caption for SigLIP)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pali3_train.config import load_config
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.stages.registry import OBJECTIVES

ROOT = Path(__file__).resolve().parents[2]


def _mask(real: list[int], size: int) -> torch.Tensor:
    return torch.arange(size)[None] < torch.tensor(real)[:, None]


def _batch() -> Batch:
    """Two 32 px images (the tiny ViT's 4 x 4 grid of 8 px patches), prompts of 3 and 1 real
    tokens out of 4, targets of 2 and 5 out of 6."""
    prompt_mask, target_mask = _mask([3, 1], 4), _mask([2, 5], 6)
    return Batch(
        images=torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        prompt=prompt_mask.long(),
        prompt_mask=prompt_mask,
        target=target_mask.long(),
        target_mask=target_mask,
        keys=("a", "b"),
        sources=("s", "s"),
        worker=0,
        health={},
    )


def test_visual_tokens_are_patches_and_text_tokens_the_real_ones():
    cfg = load_config(ROOT / "configs/models/tiny.yaml")
    assert OBJECTIVES["generative"].batch_tokens(cfg, _batch()) == {"visual": 32, "text": 4 + 7}
    assert OBJECTIVES["contrastive"].batch_tokens(cfg, _batch()) == {"visual": 32, "text": 7}


def test_visual_tokens_of_clips_count_only_their_real_frames():
    """The same two samples as clips of 5 frames, 3 and 1 of them real: 4 frames of 16 patches."""
    clips = torch.zeros(2, 5, 3, 32, 32, dtype=torch.uint8)
    batch = replace(_batch(), images=clips, frame_mask=_mask([3, 1], 5))
    cfg = load_config(ROOT / "configs/models/tiny.yaml")
    assert OBJECTIVES["generative"].batch_tokens(cfg, batch) == {"visual": 4 * 16, "text": 4 + 7}
