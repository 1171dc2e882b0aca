"""Exported weights: the same from a ZeRO-0 and a ZeRO-3 checkpoint of the same training, loadable
as the next stage's start; a checkpoint resumed on another data-parallel size holds its weights."""

from __future__ import annotations

import json

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.convert.safetensors_io import load_weights, read_metadata, save_weights
from pali3_train.engine.export import export
from pali3_train.engine.trainer import Trainer, build_model
from pali3_train.models import PaLI3, SigLIP
from pali3_train.parallel import ParallelDims
from tests.engine.conftest import launch, stage_config


def _exported(demo, tmp_path, zero: int) -> dict[str, torch.Tensor]:
    run_dir = tmp_path / f"zero{zero}"
    # adam_eps: see test_parity.py; near-zero gradients would make Adam amplify rounding.
    train = {"steps": 2, "adam_eps": 1e-6}
    config = stage_config(demo, run_dir, train=train, parallel={"zero_stage": zero})
    result = launch(config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    out = export(run_dir / "checkpoints" / "step_00000002", tmp_path / f"zero{zero}.safetensors")
    meta = read_metadata(out)
    assert (meta["format"], meta["kind"], meta["step"]) == ("pali3-train", "pali3", "2")
    assert json.loads(meta["model"])["ul2"]["vocab_size"] == 1024
    return load_weights(out)


def test_zero0_and_zero3_checkpoints_export_the_same_weights(demo, tmp_path):
    plain, sharded = _exported(demo, tmp_path, 0), _exported(demo, tmp_path, 3)
    assert (
        plain.keys()
        == sharded.keys()
        == PaLI3(load_config(stage_config(demo, tmp_path / "x")).model).state_dict().keys()
    )
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_a_tensor_parallel_stage_exports_the_weights_of_an_unsharded_run(demo, tmp_path):
    """TP=2 under ZeRO-3 gathers the live shards at the end of the stage; the file equals what
    one unsharded process trained on the same batches exports from its checkpoint."""
    weights = {}
    for label, nproc, tp, zero in (("tp2", 2, 2, 3), ("plain", 1, 1, 0)):
        run_dir = tmp_path / label
        parallel = {"zero_stage": zero, "tensor_parallel_size": tp}
        config = stage_config(demo, run_dir, train={"steps": 2, "adam_eps": 1e-6},
                              parallel=parallel)  # fmt: skip
        result = launch(config, nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert read_metadata(run_dir / "model.safetensors")["kind"] == "pali3"
        weights[label] = load_weights(run_dir / "model.safetensors")
    assert weights["tp2"].keys() == weights["plain"].keys()
    for name, value in weights["plain"].items():
        torch.testing.assert_close(weights["tp2"][name], value, atol=1e-5, rtol=0, msg=name)


def test_the_next_stage_starts_from_exported_weights(demo, tmp_path):
    weights = tmp_path / "stage1.safetensors"
    torch.manual_seed(3)
    trained = PaLI3(load_config(stage_config(demo, tmp_path / "a")).model).state_dict()
    save_weights(trained, weights, {"kind": "pali3"})
    cfg = load_config(stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)}))
    model = build_model(cfg, "2", ParallelDims(1, 1))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_stage1_takes_the_vit_of_a_stage0_siglip_file(demo, tmp_path):
    cfg = load_config(stage_config(demo, tmp_path / "a"))
    torch.manual_seed(5)
    siglip = SigLIP(cfg.model).state_dict()
    weights = tmp_path / "stage0.safetensors"
    save_weights(siglip, weights, {"kind": "siglip"})
    cfg = load_config(stage_config(demo, tmp_path / "b", stage={"init_from": str(weights)}))
    vit = build_model(cfg, "1", ParallelDims(1, 1)).vit.state_dict()
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
    stage2 = build_model(load_config(config), "2", ParallelDims(1, 1)).state_dict()
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
        build_model(cfg, "1", ParallelDims(1, 1))


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_its_weights(demo, reference, one_rank):
    checkpoint = reference / "checkpoints" / "step_00000006"
    saved = export(checkpoint, reference.parent / "ref.safetensors")
    cfg = load_config(reference / "config.yaml")
    trainer = Trainer(cfg, "1", *one_rank, resume=str(checkpoint))
    assert trainer.progress.step == 6 and (checkpoint / "universal").is_dir()
    resumed = trainer.engine.module.state_dict()
    for name, value in load_weights(saved).items():
        torch.testing.assert_close(resumed[name], value, atol=0, rtol=0, msg=name)
