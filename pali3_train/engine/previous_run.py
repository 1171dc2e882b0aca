"""What a run directory already holds, and moving it aside for ``--resume none --overwrite``.

A fresh start (``--resume none``) where a run already trained would mix two runs: metrics.jsonl
and eval.jsonl appended to, the new checkpoints written among (and over) the old ones, the local
MLflow store given a second run. ``launcher/run.py`` refuses that before anything starts unless
``--overwrite`` is given; then rank 0, holding the run directory, moves the old run into
``<run_dir>/replaced-<UTC time>/`` (a checkpoint folder outside run_dir goes beside itself,
``<checkpoint_dir>.replaced-<UTC time>``), and the new run starts in an empty directory.

Moved, not deleted: a rename within one file system takes no time and no space, cannot stop
half-way in a state where the two runs mix, and keeps the old run readable (and its MLflow
store openable) until its owner deletes the folder. Deleting only after the new run's first
checkpoint was the alternative; until then both runs' files would share one folder, which is
what this rules out. The job's own files stay where they are: the run lock and ``slurm/``
(the batch script and the log it is writing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pali3_train.config import Config

KEEP = ("run.lock", "slurm")  # the job's, not the run's
REPLACED = "replaced-"


def previous_run(cfg: Config) -> list[str]:
    """What a run left in ``cfg.run_dir`` (and its checkpoint folder), described for a message;
    empty where nothing trained there."""
    run_dir, found = Path(cfg.run_dir), []
    ckpts = sorted(Path(cfg.checkpoint_dir).glob("step_*"))
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint{'s' * (len(ckpts) > 1)} up to {ckpts[-1].name}")
    for name in ("metrics.jsonl", "eval.jsonl"):
        path = run_dir / name
        if path.is_file() and path.stat().st_size:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            last = rows[-1].get("step", "?") if rows else "?"
            found.append(f"{name} ({len(rows)} row{'s' * (len(rows) > 1)} up to step {last})")
    if (run_dir / "mlflow.db").is_file():
        found.append("an MLflow store (mlflow.db)")
    return found


def move_aside(cfg: Config, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Move the previous run out of the way (see the module docstring); ``keep``: files to
    leave, such as the config being run when it lies in run_dir. Returns where things went."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir, ckpt = Path(cfg.run_dir).resolve(), Path(cfg.checkpoint_dir).resolve()
    kept = {p.resolve() for p in keep}
    moved = []
    if ckpt.is_dir() and not ckpt.is_relative_to(run_dir):
        target = ckpt.with_name(f"{ckpt.name}.{REPLACED}{stamp}")
        ckpt.rename(target)
        moved.append(target)
    entries = [
        p
        for p in (sorted(run_dir.iterdir()) if run_dir.is_dir() else [])
        if p.name not in KEEP and not p.name.startswith(REPLACED) and p.resolve() not in kept
    ]
    if entries:
        aside = run_dir / f"{REPLACED}{stamp}"
        aside.mkdir()
        for entry in entries:
            entry.rename(aside / entry.name)
        moved.append(aside)
    return moved
