"""PaLI-3: SigLIP ViT tokens, linearly projected, prepended to the embedded prompt, fed to UL2.

The decoder is trained with teacher forcing on the target text; the loss covers target tokens
only. ``generate`` decodes with greedy or beam search over the same encoder output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pali3_train.config import ModelConfig
from pali3_train.losses.text import TokenLoss
from pali3_train.models.decoding import beam_search
from pali3_train.models.ul2 import UL2, shift_right
from pali3_train.models.vit import VisionTransformer


class PaLI3Output(NamedTuple):
    loss: torch.Tensor  # scalar, mean over real target tokens
    # [B, T, d_model]: the decoder's final hidden states; ``ul2.lm_head`` turns them into logits
    # (under tensor parallelism this rank's vocabulary shard). The loss need not keep all logits.
    hidden: torch.Tensor


class PaLI3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vit)
        self.projection = nn.Linear(cfg.vit.width, cfg.ul2.d_model)
        self.ul2 = UL2(cfg.ul2)
        # (hidden states, LM head, target, mask) -> mean over real target tokens: all logits at
        # once by default. From outside, pali3_train.parallel swaps in a collective loss for a
        # vocabulary-sharded head and pali3_train.kernels one that holds fewer logits at a time.
        self.token_loss = TokenLoss()
        nn.init.xavier_uniform_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def encode(
        self, images: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W], prompt [B, P], prompt_mask [B, P] ->
        (encoder output [B, N + P, d_model], its mask [B, N + P]); N visual tokens come first."""
        visual = self.projection(self.vit(images))
        x = torch.cat([visual, self.ul2.embed(prompt)], dim=1)
        visual_mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=prompt_mask.device)
        mask = torch.cat([visual_mask, prompt_mask.bool()], dim=1)
        return self.ul2.encode(x, mask), mask

    def forward(
        self,
        images: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        target: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> PaLI3Output:
        """target [B, T] (ending in EOS, right-padded), target_mask [B, T]."""
        memory, memory_mask = self.encode(images, prompt, prompt_mask)
        state = self.ul2.start_decoding(memory, memory_mask, use_cache=False)
        hidden = self.ul2.decode_hidden(shift_right(target, self.cfg.ul2.pad_id), state)
        loss = self.token_loss(hidden, self.ul2.lm_head, target, target_mask.bool())
        return PaLI3Output(loss, hidden)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_len: int,
        beam_size: int = 1,
        use_cache: bool = True,
        **search_options,
    ) -> torch.Tensor:
        """-> tokens [B, <= max_len], PAD after EOS. beam_size=1 is greedy decoding;
        ``search_options`` go to ``beam_search``."""
        memory, memory_mask = self.encode(images, prompt, prompt_mask)
        return beam_search(
            self.ul2, memory, memory_mask, max_len, beam_size, use_cache, **search_options
        ).tokens
