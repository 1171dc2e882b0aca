"""The registry of objectives: one ``StageSpec`` per ``stage.objective``.

A stage config's ``stage:`` section names its objective; ``OBJECTIVES`` maps that name to the
``StageSpec`` carrying everything that differs between objectives (model, loss, metrics,
evaluators, export kind, token shapes, checks); ``curriculum.CURRICULUM`` names the paper's
stages, each one of these objectives. Nothing outside this package asks which stage or objective
a run is: it asks the spec.
"""

from __future__ import annotations

import torch
from torch import nn

from pali3_train.config import Config, ConfigError
from pali3_train.engine.optim import freeze
from pali3_train.stages.contrastive import CONTRASTIVE
from pali3_train.stages.generative import GENERATIVE
from pali3_train.stages.spec import StageSpec

OBJECTIVES: dict[str, StageSpec] = {spec.objective: spec for spec in (CONTRASTIVE, GENERATIVE)}


def spec_for(cfg: Config) -> StageSpec:
    return OBJECTIVES[cfg.stage.objective]


def stage_model(cfg: Config, where: str = "config") -> nn.Module:
    """The stage's model on the meta device (no memory), with ``stage.freeze`` applied: what the
    dry run, the planner and the FLOP counter measure."""
    with torch.device("meta"):
        model = spec_for(cfg).build_model(cfg.model)
    try:
        freeze(model, cfg.stage.freeze)
    except ValueError as exc:
        raise ConfigError(where, "stage.freeze", str(exc).removeprefix("stage.freeze: ")) from None
    return model
