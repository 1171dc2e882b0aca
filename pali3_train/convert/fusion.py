"""Separate q/k/v and gate/up weights <-> our fused projections (``models/projections.py``).

HuggingFace checkpoints keep one tensor per projection, and so did pali3-train's own files before
the projections were fused (the *separate* layout: ``q_proj``/``k_proj``/``v_proj`` and
``wi_gate``/``wi_up`` beside each other under a module). The HF converters rename to and from
those names and call ``fuse_projections`` / ``split_projections``; ``engine/init_from.py`` plans
the same fusions over an old file's names (``plan_fusions``) and reads the parts as it loads.

Under a module ``M``: ``M.{q,k,v}_proj`` become ``M.qkv_proj`` where M's queries, keys and values
come from one input (``joint(M)``), otherwise ``M.q_proj`` stays and ``M.{k,v}_proj`` become
``M.kv_proj``; ``M.wi_gate`` and ``M.wi_up`` become ``M.wi``. Weights and biases alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from pali3_train.convert.rename import StateDict
from pali3_train.models.projections import fuse, split

# fused projection -> its separate parts, in the order the fused rows interleave them
PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "kv_proj": ("k_proj", "v_proj"),
    "wi": ("wi_gate", "wi_up"),
}


@dataclass(frozen=True)
class Fusion:
    """One fused tensor: the names of its separate parts, and the rows each part gives a group
    (head_dim for attention, 1 for a feed-forward's hidden unit)."""

    parts: tuple[str, ...]
    width: int


def plan_fusions(
    names: Iterable[str], head_dim: Callable[[str], int], joint: Callable[[str], bool]
) -> dict[str, Fusion]:
    """fused name -> ``Fusion`` for every group of separate projections among ``names``;
    ``head_dim(M)`` and ``joint(M)`` are asked only about modules that hold such a group."""
    names = set(names)
    plans = {}
    for name in sorted(names):
        path, _, kind = name.rpartition(".")  # kind: weight or bias
        module, _, proj = path.rpartition(".")
        if proj == "wi_gate":
            fused, width = "wi", 1
        elif proj == "k_proj":
            fused, width = ("qkv_proj" if joint(module) else "kv_proj"), head_dim(module)
        else:
            continue
        parts = tuple(f"{module}.{part}.{kind}" for part in PARTS[fused])
        missing = [part for part in parts if part not in names]
        if missing:
            raise KeyError(f"{name}: the separate projections lack {missing} to fuse with it")
        plans[f"{module}.{fused}.{kind}"] = Fusion(parts, width)
    return plans


def fuse_projections(
    state: Mapping[str, torch.Tensor],
    head_dim: Callable[[str], int],
    joint: Callable[[str], bool],
) -> StateDict:
    """A state dict in the separate layout -> the fused layout (other tensors as they are)."""
    plans = plan_fusions(state, head_dim, joint)
    consumed = {part for plan in plans.values() for part in plan.parts}
    out = {name: value for name, value in state.items() if name not in consumed}
    for name, plan in plans.items():
        out[name] = fuse([state[part] for part in plan.parts], plan.width)
    return out


def split_projections(
    state: Mapping[str, torch.Tensor], head_dim: Callable[[str], int]
) -> StateDict:
    """The fused layout -> the separate one (the inverse of ``fuse_projections``)."""
    out = {}
    for name, value in state.items():
        path, _, kind = name.rpartition(".")
        module, _, proj = path.rpartition(".")
        if proj not in PARTS:
            out[name] = value
            continue
        width = 1 if proj == "wi" else head_dim(module)
        for part, tensor in zip(PARTS[proj], split(value, len(PARTS[proj]), width)):
            out[f"{module}.{part}.{kind}"] = tensor
    return out
