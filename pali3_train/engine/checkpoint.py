"""Atomic, verifiable, resumable checkpoints around DeepSpeed's own.

A checkpoint is a folder ``step_00000100/`` holding DeepSpeed's state (``engine/``: model,
optimizer and scheduler shards), one ``rank00000.json`` per rank (RNG states, data-pipeline
state), ``meta.json`` (step, samples seen, MLflow run id, resolved config) and, written last,
``COMPLETE.json`` listing every file with its size. Everything is written into a hidden
temporary folder that is renamed into place only once complete; the ``latest`` pointer moves
after that. A crash at any moment therefore leaves the previous checkpoint whole and findable,
and a checkpoint missing a file or truncated is recognised as such (``verify``).

Nothing here unpickles: rank states and metadata are JSON; DeepSpeed's files are read by
DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pali3_train.engine.distributed import on_main_rank

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
META = "meta.json"
LATEST = "latest"
ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its folder and what is wrong."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Every RNG a training step may draw from, as JSON-able data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [list(s) if isinstance(s, tuple) else s for s in random.getstate()],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ------------------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json``: what a resume, an export and generation need besides DeepSpeed's state."""

    step: int  # optimizer steps done
    samples: int  # samples consumed, all ranks
    bad_losses: int  # micro-batches dropped for a non-finite loss, all time
    mlflow_run_id: str | None
    world_size: int  # the layout whose ZeRO shards and rank states these are
    config: dict  # the resolved config (``to_dict``): model, stage, data, ...


def write_meta(folder: Path, meta: CheckpointMeta) -> None:
    _write_json(folder / META, asdict(meta))


def read_meta(folder: Path) -> CheckpointMeta:
    try:
        return CheckpointMeta(**_upgrade(json.loads((folder / META).read_text())))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: unreadable {META} ({exc})") from None


def _upgrade(meta: dict) -> dict:
    """Checkpoints written before stages were data kept the stage name beside the config; it
    becomes the config's ``stage.name`` (its objective follows from the name)."""
    if "stage" in meta:
        stage = meta["config"].setdefault("stage", {})
        stage.setdefault("name", meta.pop("stage"))
        stage.setdefault("objective", None)
    return meta


def save(engine, root: Path, meta: CheckpointMeta, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint folder."""
    rank = dist.get_rank()
    final, tmp = root / step_name(meta.step), root / f".tmp-{step_name(meta.step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
    _write_json(tmp / f"rank{rank:05d}.json", rank_state)
    dist.barrier()
    on_main_rank(lambda: _publish(tmp, final, meta, keep_last), f"publish {final}")
    return final


def _publish(tmp: Path, final: Path, meta: CheckpointMeta, keep_last: int) -> None:
    """Rank 0, once every rank has written its part: list the files, move the folder into
    place, point ``latest`` at it and prune (on a parallel file system, minutes for a 5B run)."""
    write_meta(tmp, meta)
    _write_json(tmp / COMPLETE, {"files": _sizes(tmp)})
    shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step replaces it
    os.replace(tmp, final)
    _point_latest(final.parent, final.name)
    _prune(final.parent, keep_last)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    complete = [p for p in sorted(root.glob("step_*")) if (p / COMPLETE).is_file()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ finding


def verify(path: Path) -> None:
    """Raise ``CheckpointError`` unless every file the checkpoint listed is there, whole."""
    listing = path / COMPLETE
    if not listing.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE})")
    try:
        expected = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: unreadable {COMPLETE} ({exc})") from None
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{path}: {name} has {file.stat().st_size} bytes, expected {size}"
            )


def find_latest(root: Path) -> Path | None:
    """The newest usable checkpoint under ``root``: the ``latest`` pointer's if it verifies,
    otherwise the newest one that does (each one skipped is logged with why)."""
    pointer = root / LATEST
    candidates = sorted(root.glob("step_*"), reverse=True)
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        try:
            verify(candidate)
            return candidate
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def resolve(resume: str, root: Path) -> Path | None:
    """``--resume``: ``auto`` (latest usable under root, or none), ``none``, or a folder, which
    must verify (an explicit request for a broken checkpoint is an error, not a fresh start)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root) if root.is_dir() else None
    path = Path(resume)
    verify(path)
    return path


# ------------------------------------------------------------------------------------ loading


def convert_to_universal(path: Path) -> None:
    """Collective. DeepSpeed's ZeRO shards belong to the data-parallel size that wrote them; its
    universal format (one file per parameter and optimizer state) loads onto any. Rank 0
    converts once per checkpoint, into ``universal/``, atomically like the rest, while the
    others wait outside any collective (``on_main_rank``: a 5B conversion takes minutes)."""
    on_main_rank(lambda: _convert(path), f"convert {path} to the universal format")


def _convert(path: Path) -> None:
    if (path / UNIVERSAL_TAG).is_dir():  # decided by rank 0 alone: one view of the folder
        return
    tmp = path / f".tmp-{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(path / ENGINE_TAG),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise CheckpointError(
            f"{path}: conversion to DeepSpeed's universal format failed:\n{result.stderr[-2000:]}"
        )
    os.replace(tmp, path / UNIVERSAL_TAG)


def load_options(reshard: bool) -> dict:
    """DeepSpeed config entries for loading; the universal format is chosen at engine creation."""
    return {"checkpoint": {"load_universal": True}} if reshard else {}


def load(engine, path: Path, reshard: bool = False) -> tuple[CheckpointMeta, dict | None]:
    """Collective. Restores DeepSpeed's state in ``engine``; returns (meta, this rank's state),
    the latter None when resharding onto another world size (it belonged to the old ranks)."""
    meta = read_meta(path)
    loaded, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL_TAG if reshard else ENGINE_TAG)
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its state")
    if reshard:
        return meta, None
    rank_state = json.loads((path / f"rank{dist.get_rank():05d}.json").read_text())
    return meta, rank_state
