"""From raw shard bytes to model inputs: image decode and resize, tokenisation, batching.

Images leave the workers as uint8 and are normalised by ``model_input`` as the pipeline hands the
batch over, on the accelerator: a quarter of the bytes through the worker queues, and the
arithmetic runs where it is cheapest.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pali3_train.tokenizer import Tokenizer

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Sample:
    key: str
    source: str
    image: torch.Tensor  # uint8 [3, S, S]; in a mixture with videos a clip: uint8 [F, 3, S, S]
    prompt: str
    target: str
    epoch: int = 0  # which pass over its source the sample's shard belongs to
    references: tuple[str, ...] = ()  # every reference, where the record listed several
    frame_mask: torch.Tensor | None = None  # bool [F]: a clip's real frames (video.pad_clip)


@dataclass(frozen=True)
class Batch:
    """One batch of one data-parallel rank. ``health`` is the producing worker's counters after
    this batch (see ``health.Health``), so the consumer can report them without a side channel."""

    # uint8 [B, 3, S, S]; where the mixture has a video source, clips: uint8 [B, F, 3, S, S]
    images: torch.Tensor
    prompt: torch.Tensor  # long [B, P], PAD-padded, EOS-terminated
    prompt_mask: torch.Tensor  # bool [B, P]
    target: torch.Tensor  # long [B, T]
    target_mask: torch.Tensor  # bool [B, T]
    keys: tuple[str, ...]
    sources: tuple[str, ...]
    worker: int  # global worker index: rank * workers_per_rank + worker id
    health: dict
    epochs: tuple[int, ...] = ()  # per sample: the pass over its source (Sample.epoch)
    # per sample: every reference (Sample.references); () where the target is the one reference
    references: tuple[tuple[str, ...], ...] = ()
    frame_mask: torch.Tensor | None = None  # bool [B, F] with clips: the real frames; else None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def rows(self, start: int, stop: int) -> Batch:
        """Examples ``start:stop`` (a rank's share of a batch read by every rank)."""
        part = self._map(lambda t: t[start:stop])
        return replace(part, keys=self.keys[start:stop], sources=self.sources[start:stop],
                       epochs=self.epochs[start:stop],
                       references=self.references[start:stop])  # fmt: skip

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: fn(v) for k, v in values.items() if isinstance(v, torch.Tensor)})


def decode_image(data: bytes, size_px: int) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP -> uint8 [3, size_px, size_px], squashed to a square like PaLI's
    preprocessing (no crop: text at the borders stays visible for OCR)."""
    with Image.open(io.BytesIO(data)) as img:
        # A JPEG decodes straight to a smaller scale when it is much larger than needed.
        img.draft("RGB", (size_px, size_px))
        pixels = torch.from_numpy(np.array(img.convert("RGB")))  # [H, W, 3]
    return resize_square(pixels, size_px)


def resize_square(pixels: torch.Tensor, size_px: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, size_px, size_px], squashed (images and video frames alike)."""
    if pixels.shape[:2] == (size_px, size_px):
        return pixels.permute(2, 0, 1).contiguous()
    # torch's antialiased bilinear resize on uint8 (channels-last) is ~4x faster than PIL's.
    channels_last = pixels.permute(2, 0, 1)[None]
    resized = F.interpolate(channels_last, (size_px, size_px), mode="bilinear", antialias=True)
    return resized[0].contiguous()


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> [-1, 1], the range SigLIP's ViT was trained on."""
    return images.to(dtype) / 127.5 - 1.0


def model_input(batch: Batch, device: torch.device, image_dtype: torch.dtype) -> Batch:
    """A collated batch (uint8 images) on ``device`` with its images normalised: what every
    model of the project takes."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    return replace(batch, images=normalize_images(batch.images, image_dtype))


def collate(
    samples: Sequence[Sample],
    tokenizer: Tokenizer,
    max_prompt_tokens: int,
    max_target_tokens: int,
    worker: int,
    health: dict,
) -> Batch:
    """Stack images (or clips, all of one length) and tokenise to fixed lengths, so every step
    has the same shapes."""
    prompt, prompt_mask = tokenizer.batch_encode([s.prompt for s in samples], max_prompt_tokens)
    target, target_mask = tokenizer.batch_encode([s.target for s in samples], max_target_tokens)
    masks = [s.frame_mask for s in samples]
    return Batch(
        images=torch.stack([s.image for s in samples]),
        prompt=prompt,
        prompt_mask=prompt_mask,
        target=target,
        target_mask=target_mask,
        keys=tuple(s.key for s in samples),
        sources=tuple(s.source for s in samples),
        worker=worker,
        health=health,
        epochs=tuple(s.epoch for s in samples),
        references=tuple(s.references for s in samples),
        frame_mask=None if masks[0] is None else torch.stack(masks),
    )
