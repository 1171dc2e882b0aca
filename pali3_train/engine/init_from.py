"""Starting a stage from the weights an earlier one exported (``stage.init_from``).

The file's metadata says what kind of model wrote it; the stage's spec maps those names onto its
own model (a SigLIP file gives PaLI-3 its ViT). A ViT whose patch grid grew (stage 2's
resolution increase) keeps its learned position embeddings, resampled to the new grid, unless
``stage.resample_position_embeddings`` is off.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pali3_train.config import StageConfig
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.models.vit import VisionTransformer, resample_posemb
from pali3_train.stages.spec import StageSpec

log = logging.getLogger(__name__)


class InitError(RuntimeError):
    """The init_from weights do not fit the model; the message names the file and why."""


def load_init_weights(model: nn.Module, spec: StageSpec, stage: StageConfig) -> None:
    path = stage.init_from
    state = spec.adapt_weights(load_weights(path), read_metadata(path).get("kind"))
    _fit_position_embeddings(model, state, path, stage.resample_position_embeddings)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise InitError(
            f"stage.init_from: {path} has weights this model lacks: {sorted(unexpected)[:5]}"
        )
    if missing:
        log.info(
            "stage.init_from: %d tensors keep their initialisation: %s",
            len(missing),
            sorted(missing)[:8],
        )


def _fit_position_embeddings(
    model: nn.Module, state: dict[str, torch.Tensor], path: str, resample: bool
) -> None:
    """Position embeddings of another patch grid, resampled in place in ``state``."""
    for name, vit in model.named_modules():
        key = f"{name}.pos_embed"
        if not (isinstance(vit, VisionTransformer) and key in state):
            continue
        if state[key].shape == vit.pos_embed.shape:
            continue
        if not resample:
            raise InitError(
                f"stage.init_from: {path} has {state[key].shape[0]} position embeddings for "
                f"{key}, the model {vit.cfg.num_patches}; set stage.resample_position_embeddings"
                ": true to resample them"
            )
        log.info("stage.init_from: %s resampled from %d to %d patches",
                 key, state[key].shape[0], vit.cfg.num_patches)  # fmt: skip
        state[key] = resample_posemb(state[key], vit.cfg.grid_size)
