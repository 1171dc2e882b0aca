"""The SigLIP two-tower model trained in stage 0: image tower + MAP head, text tower, and the
learnable temperature and bias of the sigmoid loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.config import ModelConfig
from pali3_train.models.text import TextTransformer
from pali3_train.models.vit import MAPHead, VisionTransformer
from pali3_train.precision import upcast

# t' = log 10 and b = -10, the paper's initialisation: with many more negatives than positives, a
# strongly negative bias keeps the initial loss from being dominated by them. The parameters hold
# the offsets from these values because under bf16 the module's copy of a weight keeps 8
# significant bits: b = -10 itself could only move in steps of 1/16 and t' in steps of 1/64, so
# the optimizer's small updates to the fp32 master would not reach the loss for hundreds of
# steps (measured: both stayed exactly at their initial values through a 32-step bf16 run). An
# offset near 0 is held finely, and the sum is formed in fp32.
LOG_TEMPERATURE_INIT = math.log(10.0)
BIAS_INIT = -10.0


class SigLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image = VisionTransformer(cfg.vit)
        self.image_head = MAPHead(cfg.vit)
        self.text = TextTransformer(cfg.text, embed_dim=cfg.vit.width)
        # Learnable t' and b, held as offsets from the paper's initialisation (``*_INIT``).
        # Shape [1], as in HF's SigLIP: DeepSpeed's ZeRO cannot flatten 0-dim parameters.
        self.logit_scale_offset = nn.Parameter(torch.zeros(1))
        self.logit_bias_offset = nn.Parameter(torch.zeros(1))
        # The ring loss's block kernel ("plain" | "fused"), set by ``pali3_train.kernels``.
        self.ring_loss = "plain"

    def logit_scale(self) -> torch.Tensor:
        """t', the log temperature, shape [1], in fp32 (or fp64)."""
        return upcast(self.logit_scale_offset) + LOG_TEMPERATURE_INIT

    def logit_bias(self) -> torch.Tensor:
        """b, shape [1], in fp32 (or fp64)."""
        return upcast(self.logit_bias_offset) + BIAS_INIT

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> L2-normalised [B, width], in fp32 (or fp64) whatever the towers'
        dtype: the sigmoid loss is computed in fp32 (``pali3_train.precision``)."""
        return F.normalize(upcast(self.image_head(self.image(images))), dim=-1)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] -> L2-normalised [B, vit.width], in fp32 like ``embed_images``."""
        return F.normalize(upcast(self.text(tokens)), dim=-1)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_images(images), self.embed_texts(tokens)
