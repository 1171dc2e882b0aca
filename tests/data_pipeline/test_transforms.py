"""Image decode/resize against an independent resampler, normalisation, batching."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pali3_train.data_pipeline.transforms import Sample, collate, decode_image, normalize_images
from pali3_train.tokenizer import train_tokenizer


def _encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def _smooth_image(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(3 * x) * 0.5 + 0.5, y, (x + y) / 2], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def test_png_at_its_size_decodes_to_the_exact_pixels():
    pixels = _smooth_image(24)
    decoded = decode_image(_encoded(pixels, "PNG"), 24)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 24, 24)
    assert torch.equal(decoded, torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.parametrize("fmt,size", [("PNG", 32), ("JPEG", 32), ("PNG", 100), ("PNG", 300)])
def test_resizing_matches_pils_antialiased_bilinear(fmt, size):
    pixels = _smooth_image(256)
    decoded = decode_image(_encoded(pixels, fmt), size).float()
    reference = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    reference = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float()
    assert (decoded - reference).abs().mean() < 2.0  # of 255; JPEG loss and draft decode
    assert (decoded - reference).abs().max() < 12.0


def test_greyscale_and_palette_images_become_rgb():
    grey = decode_image(_encoded(_smooth_image(16)[..., 0], "PNG", "L"), 16)
    assert grey.shape == (3, 16, 16) and torch.equal(grey[0], grey[1])


def test_normalisation_maps_0_and_255_to_the_vit_range():
    out = normalize_images(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert out.tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def test_collate_stacks_and_tokenises_to_fixed_lengths(tmp_path):
    tokenizer = train_tokenizer(
        texts=["Caption in EN:", "a red square", "a much longer caption about a blue square"],
        vocab_size=60,
        model_type="bpe",
        model_path=tmp_path / "t.model",
    )
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    samples = [
        Sample("k0", "s", image, "Caption in EN:", "a red square"),
        Sample("k1", "s", image + 1, "Caption in EN:", "a much longer caption about a blue square"),
    ]
    batch = collate(samples, tokenizer, 8, 6, worker=3, health={"served": {"s": 2}})
    assert batch.images.shape == (2, 3, 4, 4) and batch.images[1].eq(1).all()
    assert batch.prompt.shape == (2, 8) and batch.target.shape == (2, 6)
    assert tokenizer.batch_decode(batch.target)[0] == "a red square"
    assert batch.target[1, -1] == tokenizer.eos_id, "an over-long target keeps its EOS"
    assert batch.target_mask[0].tolist() == [
        i < len(tokenizer.encode("a red square")) for i in range(6)
    ]
    assert (batch.keys, batch.worker, len(batch)) == (("k0", "k1"), 3, 2)
    moved = batch.to("cpu")
    assert torch.equal(moved.prompt, batch.prompt) and moved.keys == batch.keys
