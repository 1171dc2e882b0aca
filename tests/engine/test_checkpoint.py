"""Checkpoint metadata (`pali3_train.engine.checkpoint`): one dataclass written and read through
one pair of functions; a checkpoint written before stages were data still reads, its stage name
moved into the config; an unreadable one is refused before start, naming it."""

from __future__ import annotations

import json

import pytest

from pali3_train.config import ConfigError, config_from_dict, load_config, to_dict
from pali3_train.engine.checkpoint import COMPLETE, CheckpointMeta, read_meta, write_meta
from pali3_train.engine.checks import check_resume
from tests.engine.conftest import ROOT


def _config(stage0: bool = False) -> dict:
    name = "stage0" if stage0 else "stage1"
    return to_dict(load_config(ROOT / f"configs/tiny/{name}.yaml"))


def test_metadata_round_trips(tmp_path):
    meta = CheckpointMeta(7, 56, 1, "run-id", 2, _config())
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta


def test_a_checkpoint_from_before_stage_specs_reads_with_its_stage_in_the_config(tmp_path):
    old = _config(stage0=True)
    old["stage"] = {"freeze": [], "init_from": None}  # the stage section had no name, objective
    legacy = {"samples": 64, "bad_losses": 0, "mlflow_run_id": None, "stage": "0",
              "config": old, "step": 2, "world_size": 2}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(legacy))
    meta = read_meta(tmp_path)
    assert (meta.step, meta.world_size, meta.samples) == (2, 2, 64)
    stage = config_from_dict(meta.config).stage
    assert (stage.name, stage.objective) == ("0", "contrastive")


def test_an_unreadable_metadata_file_is_refused_before_start(tmp_path):
    root = tmp_path / "checkpoints"
    folder = root / "step_00000002"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{not json")
    (folder / COMPLETE).write_text(json.dumps({"files": {"meta.json": 9}}))
    cfg = load_config(ROOT / "configs/tiny/stage1.yaml", [f"checkpoint.dir={root}"])
    with pytest.raises(ConfigError, match="unreadable meta.json"):
        check_resume(cfg, str(folder))
