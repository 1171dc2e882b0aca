"""`python -m pali3_train.generate` and the batched decoding behind the evaluators: the answers
are the model's own greedy/beam tokens, decoded, from an exported file or a checkpoint folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.demo_corpus import build_demo_corpus
from data_pipeline.transforms import decode_image, normalize_images
from pali3_train.config import load_config, to_dict
from pali3_train.convert.safetensors_io import save_weights
from pali3_train.generate import generate_answers, load_pali3, prepare
from pali3_train.models import PaLI3
from pali3_train.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny PaLI-3 exported with its config and tokenizer, and a demo image."""
    folder = tmp_path_factory.mktemp("generate")
    corpus = build_demo_corpus(folder / "corpus", samples_per_source=8, samples_per_shard=8,
                               image_size_px=32, vocab_size=1024)  # fmt: skip
    cfg = load_config(ROOT / "configs" / "models" / "tiny.yaml")
    torch.manual_seed(11)
    model = PaLI3(cfg.model)
    path = folder / "model.safetensors"
    metadata = {"kind": "pali3", "model": json.dumps(to_dict(cfg.model)),
                "tokenizer": str(corpus.tokenizer_path)}  # fmt: skip
    save_weights(model.state_dict(), path, metadata)
    image = folder / "image.png"
    from PIL import Image

    pixels = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(1))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(image)
    return {"path": path, "model": model.eval(), "tokenizer": corpus.tokenizer_path, "image": image}


@pytest.mark.parametrize("beam_size", [1, 3])
def test_answers_are_the_models_decoded_tokens(exported, beam_size):
    model, tokenizer = load_pali3(exported["path"])
    reference, prompt = exported["model"], "Caption in EN:"
    batch = prepare([exported["image"]] * 2, prompt, tokenizer, 32)
    answers = generate_answers(model, tokenizer, batch, max_len=12, beam_size=beam_size)
    # Independently: resize, normalise, tokenise and decode by hand with the original model.
    pixels = normalize_images(decode_image(exported["image"].read_bytes(), 32)[None])
    ids = torch.tensor([tokenizer.encode(prompt)])
    tokens = reference.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), 12, beam_size)
    assert answers == [Tokenizer.load(exported["tokenizer"]).decode(tokens[0])] * 2


def test_the_command_line_prints_one_answer_per_image(exported):
    model, tokenizer = load_pali3(exported["path"])
    batch = prepare([exported["image"]], "Caption in EN:", tokenizer, 32)
    expected = generate_answers(model, tokenizer, batch, max_len=8)[0]
    result = subprocess.run(
        [sys.executable, "-m", "pali3_train.generate", "--checkpoint", str(exported["path"]),
         "--image", str(exported["image"]), "--prompt", "Caption in EN:", "--max-tokens", "8"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [f"{exported['image']}\t{expected}"]


def test_a_missing_image_is_named(exported, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pali3_train.generate", "--checkpoint", str(exported["path"]),
         "--image", str(tmp_path / "nope.png"), "--prompt", "x"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "nope.png is not a file" in result.stderr


def test_a_siglip_file_is_refused(tmp_path):
    path = tmp_path / "siglip.safetensors"
    save_weights({"x": torch.zeros(1)}, path, {"kind": "siglip", "model": "{}"})
    with pytest.raises(ValueError, match="no text decoder"):
        load_pali3(path)
