"""Exported weights: the same from a ZeRO-0 and a ZeRO-3 checkpoint of the same training, loadable
as the next stage's start; a checkpoint resumed on another data-parallel size holds its weights."""

from __future__ import annotations

import json

import torch

from pali3_train.config import load_config
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.engine.export import export
from pali3_train.engine.trainer import Trainer
from pali3_train.models import PaLI3
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


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_its_weights(demo, reference, one_rank):
    checkpoint = reference / "checkpoints" / "step_00000006"
    saved = export(checkpoint, reference.parent / "ref.safetensors")
    cfg = load_config(reference / "config.yaml")
    trainer = Trainer(cfg, *one_rank, resume=str(checkpoint))
    assert trainer.progress.step == 6 and (checkpoint / "universal").is_dir()
    resumed = trainer.engine.module.state_dict()
    for name, value in load_weights(saved).items():
        torch.testing.assert_close(resumed[name], value, atol=0, rtol=0, msg=name)
