"""PaLI-3: SigLIP ViT tokens, linearly projected, prepended to the embedded prompt, fed to UL2.

The decoder is trained with teacher forcing on the target text; the loss covers target tokens
only. ``generate`` decodes with greedy or beam search over the same encoder output.

A video is its frames [B, F, 3, H, W], as PaLI-3 transfers to video tasks: each frame goes
through the ViT on its own (the frames of the whole batch as one batch of B*F images, so ZeRO-3
and tensor parallelism see nothing new), and the frames' tokens follow each other in time order
before the prompt. ``frame_mask`` [B, F] marks the real frames of a clip shorter than F; the
tokens of the padded ones are masked out of the encoder's attention, like prompt padding, and
moved behind every real token: UL2's relative-position bias counts every slot, so padded frames
left between the real frames and the prompt would move the prompt's positions, and the same image
would read differently as frame 0 of a clip of 2, 4 or 16 than alone. With the padding behind,
a clip padded to any F, and an image as a one-frame clip, give what the real frames alone give. A
still image is a clip of one frame.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pali3_train.config import ModelConfig
from pali3_train.config.schema import MAX_FRAMES
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
        # One learned vector per frame position, added after the projection: it lives in the
        # space UL2's encoder reads, whatever the ViT and the projection do (frozen, or trained
        # from an image checkpoint), and it tells frames apart where the encoder cannot: its
        # relative positions share one bucket beyond 128 tokens (T5's max distance; a 224 px
        # frame is 256). Zeros at first, so a model from an image checkpoint starts unchanged.
        self.temporal_embed = (
            nn.Embedding(MAX_FRAMES, cfg.ul2.d_model) if cfg.temporal_embedding else None
        )
        self.ul2 = UL2(cfg.ul2)
        # (hidden states, LM head, target, mask) -> mean over real target tokens: all logits at
        # once by default. From outside, pali3_train.parallel swaps in a collective loss for a
        # vocabulary-sharded head and pali3_train.kernels one that holds fewer logits at a time.
        self.token_loss = TokenLoss()
        nn.init.xavier_uniform_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        if self.temporal_embed is not None:
            nn.init.zeros_(self.temporal_embed.weight)

    def embed_visual(
        self, images: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] or frames [B, F, 3, H, W], frame_mask [B, F] (True = real frame;
        None: all real) -> (visual tokens [B, F*N, d_model] frame after frame, mask [B, F*N])."""
        frames = images if images.dim() == 5 else images[:, None]
        batch, count = frames.shape[:2]
        tokens = self.projection(self.vit(frames.flatten(0, 1)))  # [B*F, N, d_model]
        tokens = tokens.unflatten(0, (batch, count))  # [B, F, N, d_model]
        if self.temporal_embed is not None:
            if count > MAX_FRAMES:
                raise ValueError(f"{count} frames: the temporal embedding has {MAX_FRAMES}")
            positions = torch.arange(count, device=tokens.device)
            tokens = tokens + self.temporal_embed(positions)[:, None]
        if frame_mask is None:
            frame_mask = torch.ones(batch, count, dtype=torch.bool, device=tokens.device)
        mask = frame_mask.bool()[:, :, None].expand(-1, -1, tokens.shape[2])
        return tokens.flatten(1, 2), mask.flatten(1)

    def encode(
        self,
        images: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (or frames and frame_mask: ``embed_visual``), prompt [B, P], prompt_mask
        [B, P] -> (encoder output [B, V + P, d_model], its mask [B, V + P]); the V visual tokens
        come first, then the prompt. With a ``frame_mask``, each sample's tokens are reordered
        real ones first (each in its order: real frames, then the real prompt) and masked ones
        after (padded frames, then prompt padding), so that padding moves no real token's
        position; the mask returned is in that order, and the decoder reads both together.
        Without one (images, or clips given without a mask: every frame real) nothing is
        reordered, so image batches compute exactly what they did before."""
        visual, visual_mask = self.embed_visual(images, frame_mask)
        x = torch.cat([visual, self.ul2.embed(prompt)], dim=1)
        mask = torch.cat([visual_mask, prompt_mask.bool()], dim=1)
        if frame_mask is not None:
            x, mask = real_first(x, mask)
        return self.ul2.encode(x, mask), mask

    def forward(
        self,
        images: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        target: torch.Tensor,
        target_mask: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> PaLI3Output:
        """target [B, T] (ending in EOS, right-padded), target_mask [B, T]; the rest as
        ``encode``."""
        memory, memory_mask = self.encode(images, prompt, prompt_mask, frame_mask)
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
        frame_mask: torch.Tensor | None = None,
        **search_options,
    ) -> torch.Tensor:
        """-> tokens [B, <= max_len], PAD after EOS. beam_size=1 is greedy decoding;
        ``search_options`` go to ``beam_search``; the inputs as ``encode``."""
        memory, memory_mask = self.encode(images, prompt, prompt_mask, frame_mask)
        return beam_search(
            self.ul2, memory, memory_mask, max_len, beam_size, use_cache, **search_options
        ).tokens


def real_first(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, D], mask [B, L] (True = real) -> both reordered per sample so that the real
    positions come first, in their order, and the masked ones after, in theirs: a stable sort of
    the mask and one gather of each (no factory call, so nothing for the device guard; tensor
    parallelism and ZeRO-3 see nothing new, every rank holding the whole sequence)."""
    # [B, L]; sorted as bytes, which every backend's sort takes
    order = torch.argsort((~mask).byte(), dim=1, stable=True)
    return x.gather(1, order[:, :, None].expand_as(x)), mask.gather(1, order)
