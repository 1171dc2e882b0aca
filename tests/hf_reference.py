"""Small random HuggingFace models built from configs (no download): the independent reference
implementations our towers are checked against."""

from __future__ import annotations

import torch
from transformers import (
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    T5Config,
    T5ForConditionalGeneration,
)

from pali3_train.config import ModelConfig, TextConfig, UL2Config, ViTConfig
from pali3_train.convert import siglip as siglip_convert
from pali3_train.convert import t5 as t5_convert

VIT = ViTConfig(image_size_px=32, patch_size_px=8, width=48, depth=2, num_heads=4, mlp_dim=96)
TEXT = TextConfig(vocab_size=64, max_len=12, width=40, depth=2, num_heads=5, mlp_dim=80)


def _randomise(model: torch.nn.Module) -> None:
    """HF initialises norms to 1/0 and biases to 0; random values make every weight count."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


def hf_siglip(vit: ViTConfig = VIT, text: TextConfig = TEXT) -> SiglipModel:
    cfg = siglip_convert.hf_config(vit, text)
    model = SiglipModel(
        SiglipConfig(
            text_config=SiglipTextConfig(**cfg["text_config"]),
            vision_config=SiglipVisionConfig(**cfg["vision_config"]),
        )
    )
    _randomise(model)
    return model.eval()


def ul2_config(feed_forward: str) -> UL2Config:
    return UL2Config(
        vocab_size=64,
        d_model=32,
        num_heads=4,
        d_kv=12,
        d_ff=48,
        num_encoder_layers=2,
        num_decoder_layers=3,
        feed_forward=feed_forward,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )


def hf_t5(cfg: UL2Config) -> T5ForConditionalGeneration:
    """A T5 v1.1 model with an untied LM head. transformers 5 always ties ``lm_head`` to
    ``shared`` on construction, so the head is given its own parameter afterwards."""
    model = T5ForConditionalGeneration(T5Config(**t5_convert.hf_config(cfg)))
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    _randomise(model)
    return model.eval()


def model_config(ul2: UL2Config) -> ModelConfig:
    return ModelConfig(vit=VIT, text=TEXT, ul2=ul2)
