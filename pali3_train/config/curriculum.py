"""The typed shape of a curriculum file: which stages run in which order, each from its own stage
config, plus untrained baselines evaluated before anything trains (``launcher/curriculum.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pali3_train.config.schema import require

Stage = Literal["0", "1", "2", "transfer"]


@dataclass(frozen=True)
class CurriculumStep:
    """One launch of ``launcher/run.py``. ``config`` is relative to the curriculum file;
    ``set`` holds extra ``--set`` overrides."""

    name: str
    stage: Stage
    config: str
    set: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(self.name.isidentifier(), "name", f"must be a plain identifier, got {self.name!r}")


@dataclass(frozen=True)
class Curriculum:
    # Baselines are evaluated, never trained, with no initial weights, in <run_dir>/<name>.
    run_dir: str
    stages: tuple[CurriculumStep, ...]
    baselines: tuple[CurriculumStep, ...] = ()
    nproc_per_node: int = 1
    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"

    def __post_init__(self) -> None:
        require(bool(self.stages), "stages", "needs at least one stage")
        require(self.nproc_per_node > 0, "nproc_per_node", "must be > 0")
        names = [step.name for step in (*self.baselines, *self.stages)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        require(not duplicates, "stages", f"step names must be unique, repeated: {duplicates}")
