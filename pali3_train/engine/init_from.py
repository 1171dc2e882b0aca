"""Starting a stage from the weights an earlier one exported (``stage.init_from``).

The file's metadata says what kind of model wrote it; the stage's spec maps those names onto its
own model (a SigLIP file gives PaLI-3 its ViT). A ViT whose patch grid grew (stage 2's
resolution increase) keeps its learned position embeddings, resampled to the new grid, unless
``stage.resample_position_embeddings`` is off.

A file written before q/k/v and gate/up were fused (separate ``q_proj``/``k_proj``/``v_proj``,
``wi_gate``/``wi_up``) loads too: its parts are read and fused in the model's layout
(``convert/fusion.py``). (DeepSpeed checkpoints of that layout do not resume.)

Tensors are read one at a time, so loading never holds the file's weights beside the model's.
Under ZeRO-3 partitioned construction (``engine/zero_init.py``) each parameter is gathered while
data-parallel rank 0 reads its tensor into it, then partitioned again: no rank holds the model
whole. Everything is checked (names and shapes) before the first tensor is read.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import is_zero_param
from torch import nn

from pali3_train.config import StageConfig
from pali3_train.convert.fusion import Fusion, plan_fusions
from pali3_train.convert.safetensors_io import WeightReader
from pali3_train.models.projections import fuse
from pali3_train.models.vit import VisionTransformer, resample_posemb
from pali3_train.stages.spec import StageSpec

log = logging.getLogger(__name__)

Source = str | Fusion  # a stored tensor's name, or the stored parts of a fused one


class InitError(RuntimeError):
    """The init_from weights do not fit the model; the message names the file and why."""


def load_init_weights(model: nn.Module, spec: StageSpec, stage: StageConfig) -> None:
    path = stage.init_from
    reader = WeightReader(path)
    targets = model.state_dict(keep_vars=True)  # parameters (partitioned or not) and buffers
    sources = _fused_separate_layout(_model_names(reader, spec), model, targets)
    unexpected = sorted(set(sources) - set(targets))
    if unexpected:
        raise InitError(f"stage.init_from: {path} has weights this model lacks: {unexpected[:5]}")
    vits = _position_embeddings(model)
    stored = reader.shapes()
    for name, source in sources.items():
        _check_shape(name, _stored_shape(stored, source), _shape(targets[name]), vits, stage)
    for name, target in targets.items():  # the model's order: the same on every rank
        if name in sources:
            read = functools.partial(_read, reader, sources[name], _shape(target), vits.get(name))
            _assign(target, read)
    missing = sorted(set(targets) - set(sources))
    if missing:
        log.info("stage.init_from: %d tensors keep their initialisation: %s",
                 len(missing), missing[:8])  # fmt: skip


def _model_names(reader: WeightReader, spec: StageSpec) -> dict[str, str]:
    """Model name -> stored name: the spec renames shape-only stand-ins of the stored tensors,
    so its mapping is known before any tensor is read."""
    shapes = reader.shapes()
    stored = {id(tensor): name for name, tensor in shapes.items()}
    renamed = spec.adapt_weights(shapes, reader.metadata.get("kind"))
    names = {}
    for name, tensor in renamed.items():
        if id(tensor) not in stored:
            raise TypeError(f"{spec.objective}: adapt_weights must rename tensors, not make them")
        names[name] = stored[id(tensor)]
    return names


def _fused_separate_layout(
    sources: dict[str, str], model: nn.Module, targets: dict[str, torch.Tensor]
) -> dict[str, Source]:
    """``sources`` with each group of separate projections (a file of the old layout) replaced
    by the fused tensor the model holds; the head size is the model's."""
    modules = dict(model.named_modules())
    plans = plan_fusions(
        sources,
        # a module the model lacks: its fused name is refused as unexpected, whatever the size
        head_dim=lambda module: modules[module].head_dim if module in modules else 1,
        joint=lambda module: f"{module}.qkv_proj.weight" in targets,
    )
    consumed = {part for plan in plans.values() for part in plan.parts}
    upgraded: dict[str, Source] = {n: s for n, s in sources.items() if n not in consumed}
    for name, plan in plans.items():
        upgraded[name] = Fusion(tuple(sources[part] for part in plan.parts), plan.width)
    return upgraded


def _stored_shape(stored: dict[str, torch.Tensor], source: Source) -> torch.Size:
    if isinstance(source, str):
        return stored[source].shape
    shapes = [stored[part].shape for part in source.parts]  # fused along their rows
    return torch.Size([sum(shape[0] for shape in shapes), *shapes[0][1:]])


def _position_embeddings(model: nn.Module) -> dict[str, VisionTransformer]:
    return {
        f"{name}.pos_embed".lstrip("."): vit
        for name, vit in model.named_modules()
        if isinstance(vit, VisionTransformer)
    }


def _shape(target: torch.Tensor) -> torch.Size:
    return target.ds_shape if is_zero_param(target) else target.shape


def _check_shape(
    name: str,
    stored: torch.Size,
    expected: torch.Size,
    vits: dict[str, VisionTransformer],
    stage: StageConfig,
) -> None:
    """A ViT's position embeddings of another patch grid are resampled if allowed; any other
    shape that differs is refused."""
    if stored == expected:
        return
    if name not in vits:
        raise InitError(
            f"stage.init_from: {stage.init_from} has {name} of shape {list(stored)}, the model "
            f"{list(expected)}"
        )
    if not stage.resample_position_embeddings:
        raise InitError(
            f"stage.init_from: {stage.init_from} has {stored[0]} position embeddings for "
            f"{name}, the model {vits[name].cfg.num_patches}; set "
            "stage.resample_position_embeddings: true to resample them"
        )
    log.info("stage.init_from: %s resampled from %d to %d patches",
             name, stored[0], vits[name].cfg.num_patches)  # fmt: skip


def _read(
    reader: WeightReader, source: Source, shape: torch.Size, vit: VisionTransformer | None
) -> torch.Tensor:
    """The stored tensor (or its separate parts, fused), resampled to ``vit``'s grid where its
    shape differs (checked already)."""
    if isinstance(source, Fusion):
        return fuse([reader.read(part) for part in source.parts], source.width)
    value = reader.read(source)
    return value if value.shape == shape else resample_posemb(value, vit.cfg.grid_size)


def _assign(target: torch.Tensor, read: Callable[[], torch.Tensor]) -> None:
    """``target`` <- ``read()``. A partitioned parameter is gathered over its data-parallel group
    and only that group's rank 0 reads; its value reaches the others as it is partitioned."""
    partitioned = is_zero_param(target)
    with deepspeed.zero.GatheredParameters([target], modifier_rank=0, enabled=partitioned):
        if not partitioned or dist.get_rank(target.ds_process_group) == 0:
            with torch.no_grad():
                target.data.copy_(read())
