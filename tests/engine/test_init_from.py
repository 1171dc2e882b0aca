"""A stage starts from an earlier stage's export (`pali3_train.engine.init_from`, through
`engine.build.build_model`): PaLI-3 weights as they are, a SigLIP file's image tower as PaLI-3's
ViT, an imported T5 as its encoder-decoder, position embeddings resampled to a new patch grid
(or refused when the config says so), and weights with no place in the model refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.convert.rename import add_prefix
from pali3_train.convert.safetensors_io import save_weights
from pali3_train.engine.build import build_model
from pali3_train.engine.init_from import InitError, load_init_weights
from pali3_train.models import UL2, PaLI3, SigLIP
from pali3_train.parallel import ParallelDims
from pali3_train.stages.registry import spec_for
from tests.engine.conftest import stage_config


def test_the_next_stage_starts_from_exported_weights(demo, tmp_path):
    weights = tmp_path / "stage1.safetensors"
    torch.manual_seed(3)
    trained = PaLI3(load_config(stage_config(demo, tmp_path / "a")).model).state_dict()
    save_weights(trained, weights, {"kind": "pali3"})
    cfg = load_config(stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)}))
    model = build_model(cfg, ParallelDims(1, 1))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_an_image_checkpoint_starts_a_temporal_embedding_at_zeros(demo, tmp_path, caplog):
    """A video transfer with the temporal embedding on, from a stage 1/2 file without it: the
    file's weights load as they are, the table starts at zeros (the image model, unchanged) and
    the log names it."""
    weights = tmp_path / "stage1.safetensors"
    torch.manual_seed(3)
    trained = PaLI3(load_config(stage_config(demo, tmp_path / "a")).model).state_dict()
    save_weights(trained, weights, {"kind": "pali3"})
    config = stage_config(demo, tmp_path / "b", model={"temporal_embedding": True},
                          stage={"init_from": str(weights)})  # fmt: skip
    with caplog.at_level("INFO", logger="pali3_train.engine.init_from"):
        state = build_model(load_config(config), ParallelDims(1, 1)).state_dict()
    assert sorted(state) == sorted([*trained, "temporal_embed.weight"])
    assert all(torch.equal(state[name], value) for name, value in trained.items())
    assert not state["temporal_embed.weight"].any()
    assert "1 tensors keep their initialisation: ['temporal_embed.weight']" in caplog.text


def test_stage1_takes_the_vit_of_a_stage0_siglip_file(demo, tmp_path):
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    torch.manual_seed(5)
    siglip = SigLIP(cfg.model).state_dict()
    weights = tmp_path / "stage0.safetensors"
    save_weights(siglip, weights, {"kind": "siglip"})
    cfg = load_config(stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)}))
    vit = build_model(cfg, ParallelDims(1, 1)).vit.state_dict()
    assert vit and all(torch.equal(v, siglip[f"image.{k}"]) for k, v in vit.items())


def test_stage2_resamples_the_position_embeddings_to_its_higher_resolution(demo, tmp_path):
    """Stage 1 at 32 px (a 4x4 patch grid) -> stage 2 at 48 px (6x6): every other weight is
    taken as is, the position embeddings are resampled bilinearly (checked against a direct
    interpolation of the 4x4 grid)."""
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    torch.manual_seed(7)
    stage1 = PaLI3(cfg.model).state_dict()
    weights = tmp_path / "stage1.safetensors"
    save_weights(stage1, weights, {"kind": "pali3"})
    config = stage_config(demo, tmp_path / "b", model={"vit": {"image_size_px": 48}},
                          stage={"init_from": str(weights), "freeze": []})  # fmt: skip
    stage2 = build_model(load_config(config), ParallelDims(1, 1)).state_dict()
    grid = stage1["vit.pos_embed"].T.reshape(1, -1, 4, 4)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bilinear")
    assert stage2["vit.pos_embed"].shape == (36, grid.shape[1])
    torch.testing.assert_close(stage2["vit.pos_embed"], expected.reshape(-1, 36).T)
    for name, value in stage1.items():
        if name != "vit.pos_embed":
            assert torch.equal(stage2[name], value), name


def test_weights_with_no_place_in_the_model_are_refused(demo, tmp_path):
    weights = tmp_path / "odd.safetensors"
    save_weights({"something.else": torch.zeros(2)}, weights, {"kind": "pali3"})
    cfg = load_config(stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)}))
    with pytest.raises(Exception, match="has weights this model lacks: \\['something.else'\\]"):
        build_model(cfg, ParallelDims(1, 1))


def test_a_new_patch_grid_is_refused_when_resampling_is_off(demo, tmp_path):
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    weights = tmp_path / "stage1.safetensors"
    save_weights(PaLI3(cfg.model).state_dict(), weights, {"kind": "pali3"})
    stage = {"init_from": str(weights), "resample_position_embeddings": False}
    config = stage_config(demo, tmp_path / "b", model={"vit": {"image_size_px": 48}}, stage=stage)
    with pytest.raises(InitError, match="16 position embeddings for vit.pos_embed, the model 36"):
        build_model(load_config(config), ParallelDims(1, 1))


def test_an_imported_t5_gives_pali3_its_encoder_decoder(demo, tmp_path):
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    torch.manual_seed(11)
    ul2 = UL2(cfg.model.ul2).state_dict()
    weights = tmp_path / "t5.safetensors"
    save_weights(ul2, weights, {"kind": "t5"})
    config = stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)})
    model = build_model(load_config(config), ParallelDims(1, 1)).state_dict()
    for name, value in add_prefix(ul2, "ul2.").items():
        assert torch.equal(model[name], value), name


def test_a_tensor_of_another_shape_is_refused_naming_it(demo, tmp_path):
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    state = PaLI3(cfg.model).state_dict()
    state["ul2.lm_head.weight"] = torch.zeros(3, 64)
    weights = tmp_path / "odd.safetensors"
    save_weights(state, weights, {"kind": "pali3"})
    config = stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)})
    with pytest.raises(InitError, match="ul2.lm_head.weight of shape \\[3, 64\\], the model "
                                        "\\[1024, 64\\]"):  # fmt: skip
        build_model(load_config(config), ParallelDims(1, 1))


def test_a_sharded_checkpoint_loads_from_its_index(demo, tmp_path):
    """A directory with model.safetensors.index.json: each tensor read from the shard the index
    names."""
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    torch.manual_seed(13)
    trained = PaLI3(cfg.model).state_dict()
    names = sorted(trained)
    halves = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    for shard, keys in halves.items():
        save_weights({k: trained[k] for k in keys}, folder / shard, {"kind": "pali3"})
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = stage_config(demo, tmp_path / "b", stage={"init_from": str(folder)})
    model = build_model(load_config(config), ParallelDims(1, 1))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_a_spec_whose_adaptation_makes_tensors_is_refused(demo, tmp_path):
    """Tensors are read after the renaming, one at a time, so a spec may only rename."""
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    weights = tmp_path / "stage1.safetensors"
    save_weights(PaLI3(cfg.model).state_dict(), weights, {"kind": "pali3"})
    spec = dataclasses.replace(
        spec_for(cfg), adapt_weights=lambda state, kind: {k: v * 2 for k, v in state.items()}
    )
    stage = dataclasses.replace(cfg.stage, init_from=str(weights))
    with pytest.raises(TypeError, match="adapt_weights must rename tensors, not make them"):
        load_init_weights(PaLI3(cfg.model), spec, stage)


def _separate_layout(state: dict, cfg) -> dict:
    """``state`` as pali3-train wrote it before the projections were fused: separate q/k/v (and
    k/v) per attention, wi_gate/wi_up per feed-forward, cut out of the fused rows by hand."""
    heads = {"vit": (cfg.vit.num_heads, cfg.vit.width // cfg.vit.num_heads),
             "ul2": (cfg.ul2.num_heads, cfg.ul2.d_kv)}  # fmt: skip
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "kv_proj": ("k_proj", "v_proj")}
    old = {}
    for name, value in state.items():
        path, _, kind = name.rpartition(".")
        module, _, proj = path.rpartition(".")
        if proj in parts:
            h, d = heads[name.split(".")[0]]
            rows = value.view(h, len(parts[proj]), d, *value.shape[1:])
            for i, part in enumerate(parts[proj]):
                old[f"{module}.{part}.{kind}"] = rows[:, i].reshape(h * d, *value.shape[1:])
        elif proj == "wi":
            old[f"{module}.wi_gate.{kind}"] = value[0::2]  # rows [hidden unit, {gate, up}]
            old[f"{module}.wi_up.{kind}"] = value[1::2]
        else:
            old[name] = value
    return old


def test_an_export_of_the_separate_projection_layout_still_starts_a_stage(demo, tmp_path):
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    torch.manual_seed(17)
    trained = PaLI3(cfg.model).state_dict()
    old = _separate_layout(trained, cfg.model)
    assert {"vit.encoder.blocks.0.attn.v_proj.bias", "ul2.encoder_layers.0.ff.wi_up.weight",
            "ul2.decoder_layers.0.cross_attn.k_proj.weight"} <= old.keys()  # fmt: skip
    weights = tmp_path / "old.safetensors"
    save_weights(old, weights, {"kind": "pali3"})
    config = stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)})
    model = build_model(load_config(config), ParallelDims(1, 1))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
