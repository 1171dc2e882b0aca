"""Import/export of HuggingFace checkpoints: lossless round trips through real files (SigLIP's
temperature and bias within one rounding), HF loading our exports, and clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipModel

from pali3_train.config import ModelConfig
from pali3_train.convert.__main__ import main as convert_cli
from pali3_train.convert.hf_checkpoint import export_hf, import_hf, read_ours
from pali3_train.convert.safetensors_io import load_weights
from pali3_train.models import UL2, SigLIP
from tests.hf_reference import TEXT, VIT, hf_siglip, hf_t5, ul2_config


def _save_hf(model, cfg_dict, directory, shards=1):
    directory.mkdir(parents=True)
    state = {
        k: v.contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }
    (directory / "config.json").write_text(json.dumps(cfg_dict))
    if shards == 1:
        save_file(state, directory / "model.safetensors")
        return state
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


def test_siglip_import_export_round_trip_is_lossless_and_hf_loads_the_export(tmp_path):
    from pali3_train.convert.siglip import hf_config

    hf = hf_siglip()
    original = _save_hf(hf, hf_config(VIT, TEXT), tmp_path / "hf", shards=3)

    sections = import_hf("siglip", tmp_path / "hf", tmp_path / "ours.safetensors")
    assert sections == {"vit": VIT, "text": TEXT}
    export_hf(tmp_path / "ours.safetensors", tmp_path / "back")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        if key in ("logit_scale", "logit_bias"):  # held as offsets (models.siglip), |offset| < 16:
            ulp = torch.finfo(torch.float32).eps * 16  # one rounding of the offset
            torch.testing.assert_close(exported[key], value, rtol=0, atol=ulp), key
        else:
            assert torch.equal(exported[key], value), key

    reloaded = SiglipModel.from_pretrained(tmp_path / "back").eval()
    images = torch.randn(2, 3, VIT.image_size_px, VIT.image_size_px)
    tokens = torch.randint(0, TEXT.vocab_size, (2, TEXT.max_len))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=tokens, pixel_values=images).logits_per_image,
            hf(input_ids=tokens, pixel_values=images).logits_per_image,
        )


def test_imported_siglip_file_loads_strictly_into_our_model(tmp_path):
    from pali3_train.convert.siglip import hf_config

    _save_hf(hf_siglip(), hf_config(VIT, TEXT), tmp_path / "hf")
    import_hf("siglip", tmp_path / "hf", tmp_path / "ours.safetensors")
    kind, sections, state = read_ours(tmp_path / "ours.safetensors")
    assert kind == "siglip"
    SigLIP(ModelConfig(vit=sections["vit"], text=sections["text"])).load_state_dict(state)


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "gated-silu"])
def test_t5_import_export_round_trip_is_lossless(tmp_path, feed_forward):
    from pali3_train.convert.t5 import hf_config

    cfg = ul2_config(feed_forward)
    original = _save_hf(hf_t5(cfg), hf_config(cfg), tmp_path / "hf")
    assert (
        convert_cli(
            ["import", "t5", str(tmp_path / "hf"), "--out", str(tmp_path / "ul2.safetensors")]
        )
        == 0
    )
    kind, sections, state = read_ours(tmp_path / "ul2.safetensors")
    assert kind == "t5" and sections == {"ul2": cfg}
    UL2(cfg).load_state_dict(state)
    assert (
        convert_cli(["export", str(tmp_path / "ul2.safetensors"), "--out", str(tmp_path / "back")])
        == 0
    )
    exported = load_weights(tmp_path / "back")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        if key in ("logit_scale", "logit_bias"):  # held as offsets (models.siglip), |offset| < 16:
            ulp = torch.finfo(torch.float32).eps * 16  # one rounding of the offset
            torch.testing.assert_close(exported[key], value, rtol=0, atol=ulp), key
        else:
            assert torch.equal(exported[key], value), key
    assert (
        json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is False
    )


def test_bad_inputs_give_errors_naming_the_path(tmp_path, capsys):
    assert (
        convert_cli(
            ["import", "t5", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]
        )
        == 2
    )
    assert "nowhere/config.json" in capsys.readouterr().err

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="gated"):
        import_hf("t5", tmp_path / "hf", tmp_path / "x.safetensors")

    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors"):
        read_ours(tmp_path / "plain.safetensors")

    with pytest.raises(FileNotFoundError, match="empty"):
        load_weights(tmp_path / "empty")


def test_unknown_weights_are_an_error_not_silently_dropped():
    from pali3_train.convert.t5 import ul2_from_hf

    state = dict(hf_t5(ul2_config("gated-gelu")).state_dict())
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="extra"):
        ul2_from_hf(state)
