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
from torch.overrides import TorchFunctionMode

from pali3_train.config import Config, ConfigError
from pali3_train.engine.optim import freeze
from pali3_train.stages.contrastive import CONTRASTIVE
from pali3_train.stages.generative import GENERATIVE
from pali3_train.stages.spec import StageSpec

OBJECTIVES: dict[str, StageSpec] = {spec.objective: spec for spec in (CONTRASTIVE, GENERATIVE)}


def spec_for(cfg: Config) -> StageSpec:
    return OBJECTIVES[cfg.stage.objective]


class _SkipInitOnMeta(TorchFunctionMode):
    """In-place initialisers (``normal_``, ``uniform_``, ...) as no-ops on meta tensors, which hold
    no values: torch runs them there through its Python reference ops, whose first use imports
    torch._dynamo and sympy (seconds, in every refusal of ``stage.freeze``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        initialiser = getattr(func, "__module__", None) == "torch.nn.init" or getattr(
            func, "__name__", ""
        ) in ("normal_", "uniform_", "zero_", "fill_")
        target = args[0] if args else kwargs.get("tensor")
        if initialiser and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def stage_model(cfg: Config, where: str = "config") -> nn.Module:
    """The stage's model on the meta device (no memory), with ``stage.freeze`` applied: what the
    dry run, the planner and the FLOP counter measure."""
    with torch.device("meta"), _SkipInitOnMeta():
        model = spec_for(cfg).build_model(cfg.model)
    try:
        freeze(model, cfg.stage.freeze)
    except ValueError as exc:
        raise ConfigError(where, "stage.freeze", str(exc).removeprefix("stage.freeze: ")) from None
    return model
