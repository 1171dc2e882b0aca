"""PaLI-3's curriculum by name, and the objectives' names: plain data, imported by config
validation, so it loads nothing heavy (the specs themselves are in ``registry``)."""

from __future__ import annotations

from dataclasses import dataclass

# The keys of ``registry.OBJECTIVES`` (a test holds the two equal).
OBJECTIVE_NAMES = ("contrastive", "generative")


@dataclass(frozen=True)
class CurriculumStage:
    name: str
    objective: str
    freeze: tuple[str, ...]  # what PaLI-3 freezes at this stage (the planner's --model default)
    recipe: str  # the tiny config, relative to the repository root


CURRICULUM: dict[str, CurriculumStage] = {
    stage.name: stage
    for stage in (
        CurriculumStage("0", "contrastive", (), "configs/tiny/stage0.yaml"),
        CurriculumStage("1", "generative", ("vit",), "configs/tiny/stage1.yaml"),
        CurriculumStage("2", "generative", (), "configs/tiny/stage2.yaml"),
        CurriculumStage(
            "transfer", "generative", ("vit",), "configs/tiny/transfer_captioning.yaml"
        ),
    )
}
