"""SigLIP's vision transformer: patches -> tokens, plus the MAP head used by contrastive training.

PaLI-3 feeds the language model the token sequence *before* pooling; the multihead-attention-pooling
(MAP) head only serves stage 0, so it is a separate module that the two-tower model owns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.config import ViTConfig
from pali3_train.models.attention import MultiHeadAttention
from pali3_train.models.fused import LayerNorm
from pali3_train.models.transformer import MLP, Encoder, init_linears


def resample_posemb(posemb: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bilinearly resample learned position embeddings [N, D] laid out on a square grid to
    [new_grid**2, D], keeping each embedding at the same place in the image (half-pixel centres),
    which is what lets a model trained at 224 px continue at 812 or 1064 px."""
    num, dim = posemb.shape
    grid = math.isqrt(num)
    if grid * grid != num:
        raise ValueError(f"position embeddings of length {num} are not a square grid")
    if new_grid == grid:
        return posemb.clone()
    image = posemb.T.reshape(1, dim, grid, grid).float()
    resized = F.interpolate(image, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    return resized.reshape(dim, new_grid * new_grid).T.to(posemb.dtype).contiguous()


class VisionTransformer(nn.Module):
    """images [B, 3, H, W] (H = W = cfg.image_size_px) -> tokens [B, N, width],
    N = (image_size_px / patch_size_px)**2, after the final LayerNorm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size_px, stride=cfg.patch_size_px)
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, cfg.width))
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_embed, std=self.cfg.width**-0.5)
        init_linears(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size_px
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"expected {size}x{size} images (model.vit.image_size_px), "
                f"got {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, width]
        return self.encoder(x + self.pos_embed)


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned query attends over the tokens.
    tokens [B, N, D] -> pooled [B, D]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.attn = MultiHeadAttention(
            cfg.width, cfg.num_heads, cfg.width // cfg.num_heads, bias=True, joint_qkv=False
        )
        self.norm = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.probe.view(1, -1))
        init_linears(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(tokens.shape[0], -1, -1)
        x = self.attn(probe, kv=self.attn.project_kv(tokens))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]
