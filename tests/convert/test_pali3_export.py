"""A trained PaLI-3 exported as stock HuggingFace parts and imported back (``convert/pali3_hf``):
the HF parts compute what our model computes (fp32, 1e-5; greedy tokens equal), the model card's
snippet runs as written and answers as ``PaLI3.generate`` does, the directory works wherever it
is moved, the import back restores the original file exactly, and files or directories of the
wrong kind get one clear line."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    SiglipVisionModel,
    T5ForConditionalGeneration,
)

from pali3_train.config import to_dict
from pali3_train.convert.__main__ import main as convert_cli
from pali3_train.convert.hf_checkpoint import FORMAT
from pali3_train.convert.pali3_hf import CARD, export_pali3
from pali3_train.convert.safetensors_io import load_weights, read_metadata, save_weights
from pali3_train.data_pipeline.transforms import decode_image, normalize_images
from pali3_train.generate import load_pali3
from pali3_train.models import PaLI3
from pali3_train.models.ul2 import shift_right
from pali3_train.tokenizer import Tokenizer, copy_beside, train_tokenizer
from tests.hf_reference import _randomise, model_config, ul2_config

PROMPT = "Caption in EN:"
TEXTS = ["a red circle on a blue square", "two green dots", "Caption in EN: a cat"] * 4


def _save_pali3(model: PaLI3, path, tokenizer: str | None) -> None:
    """As a stage's export writes it (``engine/export.py``): kind, model config, step and the
    tokenizer's copy beside the weights, recorded by its name."""
    metadata = {"format": FORMAT, "kind": "pali3", "model": json.dumps(to_dict(model.cfg))}
    metadata["step"] = "7"
    if tokenizer is not None:
        shutil.copyfile(tokenizer, copy_beside(path))
        metadata["tokenizer"] = copy_beside(path).name
    save_weights(model.state_dict(), path, metadata)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny random PaLI-3 whose vocabulary is its tokenizer's pieces, exported to ``hf/``."""
    folder = tmp_path_factory.mktemp("pali3_export")
    tokenizer = train_tokenizer(texts=TEXTS, vocab_size=48, model_path=folder / "sp.model")
    ul2 = dataclasses.replace(ul2_config("gated-gelu"), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = PaLI3(model_config(ul2))
    _randomise(model)
    path = folder / "model.safetensors"
    _save_pali3(model.eval(), path, str(folder / "sp.model"))
    assert convert_cli(["export", str(path), "--out", str(folder / "hf")]) == 0
    image = folder / "image.png"
    pixels = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(1))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(image)
    return {"model": model, "path": path, "hf": folder / "hf", "image": image,
            "tokenizer": Tokenizer.load(folder / "sp.model")}  # fmt: skip


@pytest.fixture()
def moved(trained, tmp_path):
    """A copy of the export elsewhere, the original out of reach: nothing may point back."""
    hidden = trained["hf"].with_name("hf.away")
    trained["hf"].rename(hidden)
    try:
        yield shutil.copytree(hidden, tmp_path / "published")
    finally:
        hidden.rename(trained["hf"])


def _hf_parts(directory):
    vision = SiglipVisionModel.from_pretrained(directory / "vision").eval()
    language = T5ForConditionalGeneration.from_pretrained(directory / "language").eval()
    projection = load_file(directory / "projection.safetensors")
    return vision, lambda x: torch.nn.functional.linear(x, **projection), language


def test_the_hf_parts_compute_what_our_pali3_computes(trained, moved):
    model, tokenizer = trained["model"], trained["tokenizer"]
    vision, projection, language = _hf_parts(moved)
    assert vision.config.vision_use_head is False
    assert not [k for k in vision.state_dict() if "head" in k]  # no MAP head: PaLI-3 has none
    assert language.lm_head.weight is not language.shared.weight  # untied, as UL2's is
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    prompts = [PROMPT, "a cat"]
    prompt, prompt_mask = tokenizer.batch_encode(prompts, len(tokenizer.encode(PROMPT)))
    assert not prompt_mask.all()  # a padded row: the masks must agree too
    target, _ = tokenizer.batch_encode(["a cat", "two dots"], 4)
    with torch.no_grad():
        tokens = vision(pixel_values=images).last_hidden_state
        torch.testing.assert_close(tokens, model.vit(images), atol=1e-5, rtol=1e-5)
        embeds = torch.cat([projection(tokens), language.get_input_embeddings()(prompt)], dim=1)
        mask = torch.cat([torch.ones(2, tokens.shape[1], dtype=torch.bool), prompt_mask], dim=1)
        encoded = language.encoder(inputs_embeds=embeds, attention_mask=mask.long())
        ours, our_mask = model.encode(images, prompt, prompt_mask)
        assert torch.equal(our_mask, mask)
        torch.testing.assert_close(encoded.last_hidden_state, ours, atol=1e-5, rtol=1e-5)
        logits = language(encoder_outputs=encoded, attention_mask=mask.long(),
                          decoder_input_ids=shift_right(target, 0)).logits  # fmt: skip
        hidden = model(images, prompt, prompt_mask, target, target > 0).hidden
        torch.testing.assert_close(logits, model.ul2.lm_head(hidden), atol=1e-5, rtol=1e-5)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())  # as the card's snippet
        greedy = language.generate(inputs_embeds=embeds, attention_mask=mask.long(),
                                   past_key_values=cache, max_new_tokens=12,
                                   do_sample=False)  # fmt: skip
    assert torch.equal(greedy[:, 1:], model.generate(images, prompt, prompt_mask, 12))


def _snippet(directory) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (directory / CARD).read_text(), re.DOTALL)
    assert len(blocks) == 1, "the card has one Python block: the way to run the model"
    return blocks[0]


def test_the_cards_snippet_answers_as_pali3_generate(trained, moved, monkeypatch, capsys):
    shutil.copyfile(trained["image"], moved / "image.png")  # the snippet's example names
    monkeypatch.chdir(moved)  # model_dir = Path("."): the card's own directory
    namespace: dict = {}
    exec(compile(_snippet(moved), str(moved / CARD), "exec"), namespace)
    model, tokenizer = trained["model"], trained["tokenizer"]
    pixels = normalize_images(decode_image(trained["image"].read_bytes(), 32)[None])
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    ours = model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), 32)
    assert torch.equal(namespace["tokens"][:, 1:], ours)
    assert capsys.readouterr().out == tokenizer.decode(ours[0]) + "\n"


def test_the_card_and_manifest_say_what_the_model_is(trained):
    card = (trained["hf"] / CARD).read_text()
    assert "`Caption in {lang}:`" in card and "vision_use_head: false" in card
    assert "No tokenizer" not in card and "/" + trained["path"].parent.name not in card
    manifest = json.loads((trained["hf"] / "pali3.json").read_text())
    assert manifest["model"] == to_dict(trained["model"].cfg)
    assert (manifest["image_size_px"], manifest["tokenizer"], manifest["step"]) == (
        32,
        "spiece.model",
        7,
    )


def test_importing_back_restores_the_original_file(trained, moved, tmp_path, capsys):
    out = tmp_path / "again" / "model.safetensors"
    assert convert_cli(["import", "pali3", str(moved), "--out", str(out)]) == 0
    assert "its model section" in capsys.readouterr().out
    original, back = read_metadata(trained["path"]), read_metadata(out)
    assert back == {**original, "tokenizer": "model.spiece.model"}
    assert back["model"] == original["model"]  # the model config, to the byte
    state, restored = trained["model"].state_dict(), load_weights(out)
    assert restored.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(restored[name], value), name
    assert copy_beside(out).read_bytes() == (moved / "spiece.model").read_bytes()
    shutil.move(out.parent, tmp_path / "moved_again")  # the tokenizer is found by name
    model, tokenizer = load_pali3(tmp_path / "moved_again" / "model.safetensors")
    assert tokenizer.vocab_size == trained["tokenizer"].vocab_size


def test_without_a_recorded_tokenizer_the_export_says_so(trained, tmp_path, capsys):
    path = tmp_path / "untokenised.safetensors"
    _save_pali3(trained["model"], path, tokenizer=None)
    assert convert_cli(["export", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "spiece.model").exists()
    assert "No tokenizer" in (tmp_path / "hf" / CARD).read_text()
    assert (
        convert_cli(
            ["import", "pali3", str(tmp_path / "hf"), "--out", str(tmp_path / "b.safetensors")]
        )
        == 0
    )
    assert "tokenizer" not in read_metadata(tmp_path / "b.safetensors")


def _one_error_line(capsys, argv: list[str], expected: str) -> None:
    assert convert_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_files_of_the_wrong_kind_get_one_clear_line(trained, tmp_path, capsys):
    tower = tmp_path / "ul2.safetensors"
    language = str(trained["hf"] / "language")
    assert convert_cli(["import", "t5", language, "--out", str(tower)]) == 0
    with pytest.raises(ValueError, match="a t5 file where a pali3 one is needed"):
        export_pali3(tower, tmp_path / "x")
    out = str(tmp_path / "x.safetensors")
    _one_error_line(
        capsys, ["import", "pali3", language, "--out", out], "import it as siglip or t5"
    )
    _one_error_line(
        capsys, ["import", "t5", str(trained["hf"]), "--out", out], "import it as pali3"
    )
    pali3 = str(trained["path"])
    _one_error_line(capsys, ["assemble", "--vision", pali3, "--language", str(tower), "--out", out],
                    "a pali3 file where a tower (siglip or t5) one is needed")  # fmt: skip


def test_a_temporal_embedding_is_refused_by_name(trained, tmp_path):
    cfg = dataclasses.replace(trained["model"].cfg, temporal_embedding=True)
    path = tmp_path / "video.safetensors"
    _save_pali3(PaLI3(cfg), path, None)
    with pytest.raises(ValueError, match=r"temporal embedding \(model.temporal_embedding\) has no"):
        export_pali3(path, tmp_path / "hf")
