"""Exported weights: the same from a ZeRO-0 and a ZeRO-3 checkpoint of the same training, loadable
as the next stage's start; a checkpoint resumed on another data-parallel size holds its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.engine.export import export
from pali3_train.engine.trainer import Trainer
from pali3_train.models import PaLI3
from tests.engine.conftest import launch, launch_together, stage_config

# adam_eps: see test_parity.py; near-zero gradients would make Adam amplify rounding.
TRAIN = {"steps": 2, "adam_eps": 1e-6}


@pytest.fixture(scope="module")
def one_process_runs(demo, tmp_path_factory) -> dict[int, Path]:
    """zero stage -> run_dir of the same 2-step training in one process under ZeRO-0 and ZeRO-3,
    launched side by side; the ZeRO-0 run is also the unsharded reference of the TP test."""
    root = tmp_path_factory.mktemp("export")
    configs = {zero: stage_config(demo, root / f"zero{zero}", train=TRAIN,
                                  parallel={"zero_stage": zero, "tensor_parallel_size": 1})
               for zero in (0, 3)}  # fmt: skip
    for result in launch_together(*((config, 1) for config in configs.values())):
        assert result.returncode == 0, result.stderr[-3000:]
    return {zero: config.with_suffix("") for zero, config in configs.items()}


def _exported(run_dir, tmp_path) -> dict[str, torch.Tensor]:
    out = export(
        run_dir / "checkpoints" / "step_00000002", tmp_path / f"{run_dir.name}.safetensors"
    )
    meta = read_metadata(out)
    assert (meta["format"], meta["kind"], meta["step"]) == ("pali3-train", "pali3", "2")
    assert json.loads(meta["model"])["ul2"]["vocab_size"] == 1024
    return load_weights(out)


def test_zero0_and_zero3_checkpoints_export_the_same_weights(demo, one_process_runs, tmp_path):
    plain, sharded = (_exported(one_process_runs[zero], tmp_path) for zero in (0, 3))
    assert (
        plain.keys()
        == sharded.keys()
        == PaLI3(load_config(stage_config(demo, tmp_path / "x")).model).state_dict().keys()
    )
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_a_tensor_parallel_stage_exports_the_weights_of_an_unsharded_run(
    demo, one_process_runs, tmp_path
):
    """TP=2 under ZeRO-3 gathers the live shards at the end of the stage; the file equals what
    one unsharded process trained on the same batches exports from its checkpoint."""
    run_dirs = {"tp2": tmp_path / "tp2", "plain": one_process_runs[0]}
    parallel = {"zero_stage": 3, "tensor_parallel_size": 2}
    result = launch(stage_config(demo, run_dirs["tp2"], train=TRAIN, parallel=parallel), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {}
    for label, run_dir in run_dirs.items():
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
