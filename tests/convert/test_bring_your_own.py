"""Bringing one's own towers: a vision-only ``SiglipVisionModel`` imports as the ViT (and MAP
head), a T5 whose LM head is tied to the embedding (transformers 5 saves no ``lm_head.weight``)
imports into our untied head with HF's output scale folded in, and ``assemble`` joins the two
into a PaLI-3 ``stage.init_from`` file. Checked against the HF models' outputs (tolerance 1e-5,
fp32) and through the real loader."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5ForConditionalGeneration

from pali3_train.config import ModelConfig, StageConfig
from pali3_train.convert import siglip as siglip_convert
from pali3_train.convert import t5 as t5_convert
from pali3_train.convert.__main__ import main as convert_cli
from pali3_train.convert.hf_checkpoint import export_hf, read_ours
from pali3_train.convert.rename import strip_prefix
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.engine.init_from import load_init_weights
from pali3_train.models import UL2, PaLI3
from pali3_train.models.ul2 import shift_right
from pali3_train.models.vit import MAPHead, VisionTransformer
from pali3_train.stages.generative import EXPORT_KIND as PALI3_KIND
from pali3_train.stages.generative import GENERATIVE
from tests.hf_reference import TEXT, VIT, _randomise, ul2_config


def _hf_vision(directory, prefixed: bool = False) -> SiglipVisionModel:
    """A random SiglipVisionModel saved as transformers 5 does (no ``vision_model.`` prefix), or
    with the prefix, as older versions did."""
    cfg = siglip_convert.hf_config(VIT, None)
    model = SiglipVisionModel(SiglipVisionConfig(**cfg))
    _randomise(model)
    if prefixed:
        directory.mkdir(parents=True)
        state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(cfg))
    else:
        model.save_pretrained(directory)
    return model.eval()


def _our_vision(state):
    vit, head = VisionTransformer(VIT).eval(), MAPHead(VIT).eval()
    vit.load_state_dict(strip_prefix(state, "image."))
    head.load_state_dict(strip_prefix(state, "image_head."))
    return vit, head


@pytest.mark.parametrize("prefixed", [False, True])
def test_a_vision_only_siglip_imports_as_the_vit_and_exports_back(tmp_path, prefixed):
    hf = _hf_vision(tmp_path / "hf", prefixed)
    out = tmp_path / "vit.safetensors"
    assert convert_cli(["import", "siglip", str(tmp_path / "hf"), "--out", str(out)]) == 0
    kind, sections, state = read_ours(out)
    assert kind == "siglip" and sections == {"vit": VIT}
    vit, head = _our_vision(state)
    images = torch.randn(2, 3, VIT.image_size_px, VIT.image_size_px)
    with torch.no_grad():
        reference = hf(pixel_values=images)
        tokens = vit(images)
        torch.testing.assert_close(tokens, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head(tokens), reference.pooler_output, atol=1e-5, rtol=1e-5)

    export_hf(out, tmp_path / "back")
    reloaded = SiglipVisionModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).pooler_output,
                                   reference.pooler_output, atol=0, rtol=0)  # fmt: skip


def _hf_t5(directory, scaled: bool) -> T5ForConditionalGeneration:
    """A random gated T5 saved by transformers 5, which ties ``lm_head`` to ``shared`` whatever
    the config says and so saves no ``lm_head.weight``; ``scaled``: original T5's
    ``tie_word_embeddings=True`` (the decoder output scaled by d_model**-0.5), else v1.1's."""
    cfg = {**t5_convert.hf_config(ul2_config("gated-gelu")), "tie_word_embeddings": scaled}
    model = T5ForConditionalGeneration(T5Config(**cfg))
    _randomise(model)
    assert model.lm_head.weight is model.shared.weight
    model.save_pretrained(directory)
    assert "lm_head.weight" not in load_weights(directory)
    return model.eval()


@pytest.mark.parametrize("scaled", [True, False])
def test_a_tied_t5_head_is_copied_into_ours_and_scaled_as_hf_does(tmp_path, caplog, scaled):
    cfg = ul2_config("gated-gelu")
    hf = _hf_t5(tmp_path / "hf", scaled)
    out = tmp_path / "ul2.safetensors"
    with caplog.at_level(logging.WARNING, logger="pali3_train.convert.t5"):
        assert convert_cli(["import", "t5", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert "tied to shared.weight" in caplog.text
    assert ("d_model**-0.5" in caplog.text) == scaled
    _, sections, state = read_ours(out)
    ours = UL2(sections["ul2"]).eval()
    ours.load_state_dict(state)
    assert torch.equal(state["lm_head.weight"], state["embed.weight"]) is not scaled

    inputs = torch.randint(2, cfg.vocab_size, (2, 7))
    targets = torch.randint(2, cfg.vocab_size, (2, 5))
    mask = torch.ones_like(inputs, dtype=torch.bool)
    with torch.no_grad():
        reference = hf(input_ids=inputs, attention_mask=mask.long(), labels=targets).logits
        logits = ours(inputs, mask, shift_right(targets, cfg.pad_id))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_a_missing_untied_head_is_an_error():
    state = {"shared.weight": torch.zeros(4, 2)}
    with pytest.raises(KeyError, match="lm_head.weight missing"):
        t5_convert.ul2_from_hf(state, {"tie_word_embeddings": False, "d_model": 2})
    with pytest.raises(KeyError, match="lm_head.weight missing"):
        t5_convert.ul2_from_hf(state)  # no config: nothing says it is tied


def _import(kind: str, src, out):
    assert convert_cli(["import", kind, str(src), "--out", str(out)]) == 0
    return read_ours(out)[2]


def test_assembled_towers_start_a_pali3_stage_through_init_from(tmp_path):
    _hf_vision(tmp_path / "siglip")
    _hf_t5(tmp_path / "t5", scaled=False)
    siglip = _import("siglip", tmp_path / "siglip", tmp_path / "vit.safetensors")
    ul2 = _import("t5", tmp_path / "t5", tmp_path / "ul2.safetensors")
    out = tmp_path / "init.safetensors"
    towers = ["--vision", str(tmp_path / "siglip"), "--language", str(tmp_path / "ul2.safetensors")]
    assert convert_cli(["assemble", *towers, "--out", str(out)]) == 0  # an HF dir and our file
    assert read_metadata(out)["kind"] == PALI3_KIND

    torch.manual_seed(0)
    model = PaLI3(ModelConfig(vit=VIT, text=TEXT, ul2=ul2_config("gated-gelu")))
    projection = {k: v.clone() for k, v in model.projection.state_dict().items()}
    load_init_weights(model, GENERATIVE, StageConfig(init_from=str(out)))
    for name, value in strip_prefix(siglip, "image.").items():
        assert torch.equal(model.vit.state_dict()[name], value), name
    for name, value in ul2.items():
        assert torch.equal(model.ul2.state_dict()[name], value), name
    for name, value in projection.items():  # new in PaLI-3: keeps its initialisation
        assert torch.equal(model.projection.state_dict()[name], value), name


def test_assemble_refuses_a_tower_of_the_wrong_kind(tmp_path, capsys):
    _hf_t5(tmp_path / "t5", scaled=False)
    _import("t5", tmp_path / "t5", tmp_path / "ul2.safetensors")
    ul2 = str(tmp_path / "ul2.safetensors")
    out = str(tmp_path / "x.safetensors")
    assert convert_cli(["assemble", "--vision", ul2, "--language", ul2, "--out", out]) == 2
    assert "a t5 file where a siglip one is needed" in capsys.readouterr().err
