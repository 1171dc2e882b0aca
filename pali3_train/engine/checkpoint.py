"""Atomic, verifiable, resumable checkpoints around DeepSpeed's own.

A checkpoint is a folder ``step_00000100/`` holding DeepSpeed's state (``engine/``: model,
optimizer and scheduler shards), one ``rank00000.json`` per rank (RNG states, data-pipeline
state), ``meta.json`` (step, samples seen, MLflow run id, resolved config), a copy of the tokenizer
(``tokenizer.model``, so a moved checkpoint still decodes) and, written last,
``COMPLETE.json`` listing every file with its size and SHA-256. Everything is written into a
hidden temporary folder that is renamed into place only once complete; the ``latest`` pointer
moves after that. A crash at any moment therefore leaves the previous checkpoint whole and
findable, and a checkpoint missing a file, truncated or with a flipped byte is recognised as
such before anything of it is loaded (``verify``); ``--resume auto`` then falls back to the
newest one that verifies. The ranks share the hashing, on save and on load, so its cost per rank
falls as the job grows. A save first checks that the file system has room for it, and an OS
error while saving names the folder and the cause; either way the run stops with the previous
checkpoint untouched.

Nothing here unpickles: rank states and metadata are JSON, and DeepSpeed's files are read under
torch's weights-only unpickler with an allow-list (``engine.safe_load``) unless the user states
that the checkpoint is trusted (``--trust-checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from errno import ENOSPC
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from pali3_train.engine.distributed import gather_objects, on_main_rank
from pali3_train.engine.safe_load import weights_only_loads

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
META = "meta.json"
TOKENIZER = "tokenizer.model"
LATEST = "latest"
ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"
DIGEST = "sha256"
FREE_SPACE_MARGIN = 1.1  # a save needs this much more room than the last checkpoint took
NEARLY_FULL = 64 << 20  # a failed write with less free than this: the disk filled up


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


def tokenizer_of(folder: Path, meta: CheckpointMeta) -> str | None:
    """The checkpoint's own copy of its tokenizer, or (checkpoints written before the copy) the
    path its config names."""
    copy = folder / TOKENIZER
    return str(copy) if copy.is_file() else meta.config.get("data", {}).get("tokenizer_path")


def _upgrade(meta: dict) -> dict:
    """Checkpoints written before stages were data kept the stage name beside the config; it
    becomes the config's ``stage.name`` (its objective follows from the name)."""
    if "stage" in meta:
        stage = meta["config"].setdefault("stage", {})
        stage.setdefault("name", meta.pop("stage"))
        stage.setdefault("objective", None)
    return meta


def save(engine, root: Path, meta: CheckpointMeta, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint folder. Raises
    ``CheckpointError`` on every rank if the file system lacks room for it (nothing written),
    and on the rank that hit an OS error while writing (its peers are stopped by the
    launcher); the previous checkpoint stays whole and ``latest`` in both cases."""
    rank = dist.get_rank()
    final, tmp = root / step_name(meta.step), root / f".tmp-{step_name(meta.step)}"
    if rank == 0:
        for leftover in root.glob(".tmp-step_*"):  # from a crash or failure during a save
            shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()
    _raise_on_any_rank(_lack_of_space(root, engine))
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()

    def write_own_part() -> None:
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        _write_json(tmp / f"rank{rank:05d}.json", rank_state)

    _explained(write_own_part, tmp)
    dist.barrier()
    digests = _merge(gather_objects(_digest_share(tmp, rank, dist.get_world_size())))

    def publish() -> None:
        _explained(lambda: _publish(tmp, final, meta, digests, keep_last), tmp)

    on_main_rank(publish, f"publish {final}")
    return final


def _explained(write: Callable[[], None], tmp: Path) -> None:
    """Run ``write``; an OS error becomes ``CheckpointError``'s one line with path and cause."""
    try:
        write()
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(_save_failure(tmp, exc)) from exc


def _publish(
    tmp: Path, final: Path, meta: CheckpointMeta, digests: dict[str, str], keep_last: int
) -> None:
    """Rank 0, once every rank has written its part: list the files, move the folder into
    place, point ``latest`` at it and prune (on a parallel file system, minutes for a 5B run)."""
    write_meta(tmp, meta)
    digests[META] = _digest(tmp / META)
    source = meta.config.get("data", {}).get("tokenizer_path")
    if source and Path(source).is_file():
        shutil.copyfile(source, tmp / TOKENIZER)
        digests[TOKENIZER] = _digest(tmp / TOKENIZER)
    listing = {name: {"bytes": (tmp / name).stat().st_size, DIGEST: digest}
               for name, digest in sorted(digests.items())}  # fmt: skip
    _write_json(tmp / COMPLETE, {"files": listing})
    shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step replaces it
    os.replace(tmp, final)
    _point_latest(final.parent, final.name)
    _prune(final.parent, keep_last)


def _lack_of_space(root: Path, engine) -> str | None:
    """Why this rank's view of the file system cannot take the next checkpoint, or None."""
    needed = int(_expected_bytes(root, engine) * FREE_SPACE_MARGIN)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free >= needed:
        return None
    return (
        f"{root}: not enough free space for the next checkpoint ({_gib(free)} free, about "
        f"{_gib(needed)} needed): free space there or lower checkpoint.keep_last"
    )


def _expected_bytes(root: Path, engine) -> int:
    """The newest complete checkpoint's size, or before the first one an estimate from the
    parameters: weights in their dtype, plus fp32 master weights and Adam's two moments for
    the trained ones."""
    for folder in sorted(root.glob("step_*"), reverse=True):
        try:
            return sum(_entry_bytes(e) for e in _listing(folder).values())
        except CheckpointError:
            continue
    total = 0
    for p in engine.module.parameters():
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps only a partition locally
        total += numel * (p.element_size() + (12 if p.requires_grad else 0))
    return total


def _save_failure(tmp: Path, exc: BaseException) -> str:
    """The one line that says where a save failed and why (torch's own message for a full disk,
    when it writes to a path, names neither the file nor the cause)."""
    where = getattr(exc, "filename", None) or tmp  # engine.durable_files names its file
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.is_dir() else 0
    errno = exc.errno if isinstance(exc, OSError) else None
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    cause = (os.strerror(errno) if errno else text).strip().splitlines()[0]
    if errno == ENOSPC or free < NEARLY_FULL:
        cause = f"no space left on the device ({_gib(free)} free; {cause})"
    return f"saving a checkpoint failed at {where}: {cause}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _raise_on_any_rank(error: str | None) -> None:
    """Collective: raise ``CheckpointError`` on every rank if any rank has an error (the first
    rank's message), so that every rank takes the same path."""
    first = next((e for e in gather_objects(error) if e is not None), None)
    if first is not None:
        raise CheckpointError(first)


# ---------------------------------------------------------------------------------- digests


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, DIGEST).hexdigest()


def _files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE]  # fmt: skip


def _digest_share(folder: Path, rank: int, world: int) -> dict[str, str]:
    """This rank's share of the folder's files (every ``world``-th), hashed."""
    return {name: _digest(folder / name) for name in _files(folder)[rank::world]}


def _merge(shares: list[dict[str, str]]) -> dict[str, str]:
    return {name: digest for share in shares for name, digest in share.items()}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    complete = [p for p in sorted(root.glob("step_*")) if (p / COMPLETE).is_file()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ finding


def _listing(path: Path) -> dict[str, Any]:
    listing = path / COMPLETE
    if not listing.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE})")
    try:
        return json.loads(listing.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: unreadable {COMPLETE} ({exc})") from None


def _entry_bytes(entry: int | dict) -> int:
    return entry if isinstance(entry, int) else entry["bytes"]  # int: before checksums


def verify(path: Path, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> None:
    """Raise ``CheckpointError`` unless every file the checkpoint listed is there, whole, and
    (``checksums``) has the listed SHA-256: for the files of ``share`` = (rank, world), every
    ``world``-th; sizes are checked for all. A checkpoint written before checksums has sizes
    only."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    rank, world = share
    for index, (name, entry) in enumerate(sorted(_listing(path).items())):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        size, expected = file.stat().st_size, _entry_bytes(entry)
        if size != expected:
            raise CheckpointError(f"{path}: {name} has {size} bytes, expected {expected}")
        if checksums and index % world == rank and isinstance(entry, dict):
            if _digest(file) != entry[DIGEST]:
                raise CheckpointError(f"{path}: {name} is corrupt (its {DIGEST} differs from "
                                      f"the one recorded in {COMPLETE})")  # fmt: skip


def verify_on_all_ranks(path: Path) -> None:
    """Collective ``verify``: the ranks share the hashing; every rank raises if any found a
    fault."""
    share = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        verify(path, share=share)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    _raise_on_any_rank(error)


Check = Callable[[Path], None]


def sizes_only(path: Path) -> None:
    """``verify`` without reading the files: what a check before start can afford on every
    rank (the hashes are checked collectively once the ranks are up)."""
    verify(path, checksums=False)


def find_latest(root: Path, check: Check = verify) -> Path | None:
    """The newest usable checkpoint under ``root``: the ``latest`` pointer's if it passes
    ``check``, otherwise the newest one that does (each one skipped is logged with why)."""
    pointer = root / LATEST
    candidates = sorted(root.glob("step_*"), reverse=True)
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        try:
            check(candidate)
            return candidate
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def resolve(resume: str, root: Path, check: Check = verify) -> Path | None:
    """``--resume``: ``auto`` (latest usable under root, or none), ``none``, or a folder, which
    must pass ``check`` (an explicit request for a broken checkpoint is an error, not a fresh
    start)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root, check) if root.is_dir() else None
    path = Path(resume)
    check(path)
    return path


# ------------------------------------------------------------------------------------ loading


def convert_to_universal(path: Path, trusted: bool = False) -> None:
    """Collective. DeepSpeed's ZeRO shards belong to the data-parallel size that wrote them; its
    universal format (one file per parameter and optimizer state) loads onto any. Rank 0
    converts once per checkpoint, into ``universal/``, atomically like the rest, while the
    others wait outside any collective (``on_main_rank``: a 5B conversion takes minutes)."""
    on_main_rank(lambda: _convert(path, trusted), f"convert {path} to the universal format")


def _convert(path: Path, trusted: bool) -> None:
    if (path / UNIVERSAL_TAG).is_dir():  # decided by rank 0 alone: one view of the folder
        return
    tmp = path / f".tmp-{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal" if trusted else "pali3_train.engine.safe_load",
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
        refused = _refused_type(result.stderr)
        if refused:
            raise CheckpointError(_untrusted(path, refused))
        raise CheckpointError(
            f"{path}: conversion to DeepSpeed's universal format failed:\n{result.stderr[-2000:]}"
        )
    os.replace(tmp, path / UNIVERSAL_TAG)


def load_options(reshard: bool) -> dict:
    """DeepSpeed config entries for loading; the universal format is chosen at engine creation."""
    return {"checkpoint": {"load_universal": True}} if reshard else {}


def load(
    engine, path: Path, reshard: bool = False, trusted: bool = False
) -> tuple[CheckpointMeta, dict | None]:
    """Collective. Restores DeepSpeed's state in ``engine`` (weights-only unpickling unless
    ``trusted``); returns (meta, this rank's state), the latter None when resharding onto
    another world size (it belonged to the old ranks)."""
    meta = read_meta(path)
    try:
        with weights_only_loads(not trusted):
            tag = UNIVERSAL_TAG if reshard else ENGINE_TAG
            loaded, _ = engine.load_checkpoint(str(path), tag=tag)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_untrusted(path, _refused_type(str(exc)) or str(exc))) from None
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its state")
    if reshard:
        return meta, None
    rank_state = json.loads((path / f"rank{dist.get_rank():05d}.json").read_text())
    return meta, rank_state


def read_rank_states(path: Path) -> list[dict]:
    """Every rank's state (``rank*.json``), in rank order: resuming on another data layout
    re-partitions the data of all the old ranks (``data_pipeline.elastic``)."""
    return [json.loads(p.read_text()) for p in sorted(path.glob("rank*.json"))]


def _refused_type(message: str) -> str | None:
    """The type named by torch's weights-only refusal (``Unsupported global: GLOBAL x.y``)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def _untrusted(path: Path, refused: str) -> str:
    return (
        f"{path}: holds {refused}, which the weights-only loader does not allow (it could run "
        "code); resume it only if you trust where it came from, with --trust-checkpoint"
    )
