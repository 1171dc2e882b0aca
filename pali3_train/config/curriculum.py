"""The typed shape of a curriculum file: which stages run in which order, each from its own stage
config, plus untrained baselines evaluated before anything trains (``launcher/curriculum.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pali3_train.config.schema import require
from pali3_train.stages.curriculum import CURRICULUM


@dataclass(frozen=True)
class CurriculumStep:
    """One launch of ``launcher/run.py``. ``config`` is relative to the curriculum file (its
    ``stage:`` section says what trains); ``set`` holds extra ``--set`` overrides; ``stage``, if
    given, is checked against the config like ``run.py --stage``."""

    name: str
    config: str
    stage: str | None = None
    set: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(self.name.isidentifier(), "name", f"must be a plain identifier, got {self.name!r}")
        require(
            self.stage is None or self.stage in CURRICULUM,
            "stage",
            f"unknown stage {self.stage!r}; the curriculum's stages are {', '.join(CURRICULUM)}",
        )


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
