"""SigLIP's text tower (stage 0): tokens -> one embedding to compare with the image's.

As in SigLIP, texts are padded to a fixed length with no attention mask, and the embedding is read
at the last position through a linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from pali3_train.config import TextConfig
from pali3_train.models.transformer import Encoder, init_linears


class TextTransformer(nn.Module):
    """tokens [B, L] (L <= cfg.max_len) -> pooled embedding [B, embed_dim]."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.max_len, cfg.width))
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.width, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=self.cfg.width**-0.5)
        nn.init.normal_(self.pos_embed, std=self.cfg.width**-0.5)
        init_linears(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.cfg.max_len:
            raise ValueError(
                f"text of {length} tokens exceeds model.text.max_len={self.cfg.max_len}"
            )
        x = self.encoder(self.token_embed(tokens) + self.pos_embed[:length])
        return self.head(x[:, -1])
