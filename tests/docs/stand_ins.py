"""Tiny stand-ins for the files that the docs' commands name but a checkout does not hold:
published HuggingFace towers with their tokenizers, texts to train a tokenizer on, photos. Random
weights at a few thousand parameters: what matters is that the commands take them as they would
take the real files."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from pali3_train.config import TextConfig, UL2Config, ViTConfig
from pali3_train.tokenizer import train_tokenizer
from tests.hf_reference import hf_siglip, hf_t5

VIT = ViTConfig(image_size_px=32, patch_size_px=8, width=48, depth=2, num_heads=4, mlp_dim=96)
TEXT = TextConfig(vocab_size=256, max_len=64, width=40, depth=2, num_heads=5, mlp_dim=80)
UL2 = UL2Config(vocab_size=256, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2,
                num_decoder_layers=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=20)  # fmt: skip
PROMPTS = ["Caption in EN:", "Answer in EN:"]
SHAPES = [f"a {colour} {shape} at the {place}" for colour in ("red", "green", "blue", "grey")
          for shape in ("circle", "square", "star")
          for place in ("top", "bottom", "left")]  # fmt: skip


def hf_towers(siglip_dir: Path, t5_dir: Path, texts: list[str]) -> None:
    """A ``SiglipModel`` and a T5 v1.1 checkpoint directory, each with a ``spiece.model`` (T5's
    ids) trained on ``texts`` and the prompts, within the tower's vocabulary."""
    towers = ((siglip_dir, hf_siglip(VIT, TEXT), 160), (t5_dir, hf_t5(UL2), 200))
    for folder, model, vocab in towers:
        model.save_pretrained(folder)
        train_tokenizer(texts=texts + PROMPTS, vocab_size=vocab, model_type="bpe",
                        model_path=folder / "spiece.model")  # fmt: skip


def photos(folder: Path) -> None:
    """The two images data.md's records name: ``photos/cats/0001.jpg`` and ``photos/street.png``."""
    (folder / "photos" / "cats").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 120, 40)).save(folder / "photos" / "cats" / "0001.jpg")
    Image.new("RGB", (30, 40), (90, 90, 90)).save(folder / "photos" / "street.png")


def conversion_inputs(folder: Path) -> None:
    """What conversion.md names: two HF checkpoint directories under ``path/to/``, texts one per
    line (``a.txt``) and as JSONL (``b.jsonl``, ``c.jsonl``), and a T5-style ``spiece.model``."""
    hf_towers(folder / "path/to/siglip-hf-dir", folder / "path/to/t5-v1_1-or-ul2-dir", SHAPES)
    (folder / "a.txt").write_text("".join(f"{text}\n" for text in SHAPES))
    for name in ("b.jsonl", "c.jsonl"):
        (folder / name).write_text("".join(json.dumps({"caption": t}) + "\n" for t in SHAPES))
    train_tokenizer(texts=SHAPES, vocab_size=100, model_path=folder / "spiece.model")
