"""Checkpoint metadata (`pali3_train.engine.checkpoint`): one dataclass written and read through
one pair of functions; a checkpoint written before stages were data still reads, its stage name
moved into the config; an unreadable one is refused before start, naming it. Verification: a
flipped bit is found by the file's SHA-256 (the ranks' shares together hash every file), sizes
still check older listings, and ``auto`` skips a corrupt latest."""

from __future__ import annotations

import json
import shutil

import pytest

from pali3_train.config import ConfigError, config_from_dict, load_config, to_dict
from pali3_train.engine.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointMeta,
    find_latest,
    read_meta,
    sizes_only,
    verify,
    write_meta,
)
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


def _listed_folder(tmp_path, with_digests: bool = True):
    """A checkpoint-like folder: two files and a listing written by hand (hashlib, not ours)."""
    import hashlib

    folder = tmp_path / "step_00000002"
    (folder / "engine").mkdir(parents=True)
    files = {"engine/optim.pt": bytes(range(256)) * 64, "rank00000.json": b'{"rng": 1}'}
    listing = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        listing[name] = {"bytes": len(data), "sha256": digest} if with_digests else len(data)
    (folder / COMPLETE).write_text(json.dumps({"files": listing}))
    return folder


def test_a_flipped_bit_is_found_by_its_checksum_and_the_file_named(tmp_path):
    folder = _listed_folder(tmp_path)
    verify(folder)
    data = bytearray((folder / "engine/optim.pt").read_bytes())
    data[5000] ^= 0x01
    (folder / "engine/optim.pt").write_bytes(bytes(data))
    sizes_only(folder)  # same size: only the checksum can tell
    with pytest.raises(CheckpointError, match="engine/optim.pt is corrupt"):
        verify(folder)
    with pytest.raises(CheckpointError, match="corrupt"):
        verify(folder, share=(0, 2))  # the first of two ranks hashes the first file
    verify(folder, share=(1, 2))  # the second one hashes only the rank state


def test_a_checkpoint_listed_before_checksums_still_verifies_by_size(tmp_path):
    folder = _listed_folder(tmp_path, with_digests=False)
    verify(folder)
    (folder / "rank00000.json").write_text("{}")
    with pytest.raises(CheckpointError, match="rank00000.json has 2 bytes, expected 10"):
        verify(folder)


def test_auto_falls_back_past_a_corrupt_latest_and_a_missing_folder_is_named(tmp_path):
    older = _listed_folder(tmp_path)
    newer = older.with_name("step_00000004")
    shutil.copytree(older, newer)
    (tmp_path / "latest").write_text(newer.name)
    (newer / "rank00000.json").write_text('{"rng": 2}')
    assert find_latest(tmp_path) == older
    assert find_latest(tmp_path, sizes_only) == newer
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        verify(tmp_path / "step_00000006")
