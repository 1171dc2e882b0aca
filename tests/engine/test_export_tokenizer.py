"""An export carries its tokenizer: a copy beside the weights, named relatively in the metadata,
so a moved (or published) run folder still loads in ``generate``; older files that name an
absolute path still load."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from pali3_train.config import load_config, to_dict
from pali3_train.convert.safetensors_io import read_metadata, save_weights
from pali3_train.engine.export import save_export
from pali3_train.generate import load_pali3
from pali3_train.models import PaLI3
from pali3_train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [f"a {c} {s} on the {p}" for c in ("red", "blue") for s in ("dot", "box") for p in "ab"]


def _tiny(tmp_path: Path):
    tokenizer = train_tokenizer(texts=TEXTS, vocab_size=60, model_path=tmp_path / "tok.model")
    cfg = load_config(ROOT / "configs" / "models" / "tiny.yaml")
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer_path=str(tmp_path / "tok.model"))
    )
    torch.manual_seed(5)
    return cfg, PaLI3(cfg.model).state_dict(), tokenizer


def test_a_moved_export_loads_with_the_copy_of_its_tokenizer(tmp_path):
    cfg, state, tokenizer = _tiny(tmp_path)
    out = save_export(state, tmp_path / "run" / "model.safetensors", cfg, step=7)
    assert read_metadata(out)["tokenizer"] == "model.spiece.model"
    assert (out.parent / "model.spiece.model").read_bytes() == (tmp_path / "tok.model").read_bytes()

    moved = tmp_path / "elsewhere" / "published"
    shutil.move(out.parent, moved)
    (tmp_path / "tok.model").unlink()  # the training machine's file is gone too
    model, loaded = load_pali3(moved / "model.safetensors")
    assert Path(loaded.source) == moved / "model.spiece.model"
    assert loaded.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_an_older_export_naming_an_absolute_tokenizer_path_still_loads(tmp_path):
    cfg, state, _ = _tiny(tmp_path)
    path = tmp_path / "old" / "model.safetensors"
    metadata = {"kind": "pali3", "model": json.dumps(to_dict(cfg.model)),
                "tokenizer": str((tmp_path / "tok.model").resolve())}  # fmt: skip
    save_weights(state, path, metadata)
    _, loaded = load_pali3(path)
    assert Path(loaded.source) == (tmp_path / "tok.model").resolve()


def test_an_export_whose_tokenizer_is_gone_records_its_path_as_before(tmp_path):
    cfg, state, _ = _tiny(tmp_path)
    (tmp_path / "tok.model").unlink()
    out = save_export(state, tmp_path / "run" / "model.safetensors", cfg, step=7)
    assert read_metadata(out)["tokenizer"] == str((tmp_path / "tok.model").resolve())
    assert not (out.parent / "model.spiece.model").exists()


def test_a_checkpoint_carries_its_tokenizer_to_generate_and_to_its_export(tmp_path):
    from pali3_train.engine.checkpoint import (
        ENGINE_TAG,
        TOKENIZER,
        CheckpointMeta,
        _digest_share,
        _publish,
    )
    from pali3_train.engine.export import export

    cfg, state, tokenizer = _tiny(tmp_path)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=0))
    tmp = tmp_path / "ckpts" / ".tmp-step_00000003"  # what the ranks write, published as save does
    (tmp / ENGINE_TAG).mkdir(parents=True)
    torch.save({"module": state}, tmp / ENGINE_TAG / "mp_rank_00_model_states.pt")
    meta = CheckpointMeta(3, 6, 0, None, 1, to_dict(cfg))
    _publish(tmp, tmp_path / "ckpts" / "step_00000003", meta, _digest_share(tmp, 0, 1), 2)

    moved = tmp_path / "elsewhere" / "step_00000003"
    shutil.move(tmp_path / "ckpts" / "step_00000003", moved)
    (tmp_path / "tok.model").unlink()
    model, loaded = load_pali3(moved)  # verified: the copy is listed with its checksum
    assert Path(loaded.source) == moved / TOKENIZER
    assert loaded.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])
    out = export(moved, tmp_path / "out" / "model.safetensors")
    assert (out.parent / "model.spiece.model").read_bytes() == (moved / TOKENIZER).read_bytes()
