"""The interface of an objective: everything that differs between SigLIP pretraining and the
generative stages, as data plus small functions (torchtitan's ``TrainSpec`` habit).

The trainer, the dry run, the capacity planner, export and generation ask a ``StageSpec``
instead of testing a stage name, so a new objective is one new spec in the registry
(``pali3_train.stages``) and no new branch anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from pali3_train.config import Config, ModelConfig
from pali3_train.convert.safetensors_io import StateDict
from pali3_train.data_pipeline.transforms import Batch

if TYPE_CHECKING:
    from pali3_train.engine.flops import SampleFlops
    from pali3_train.engine.memory import Activations
    from pali3_train.eval.evaluator import EvalContext, Evaluator


@dataclass(frozen=True)
class StageSpec:
    objective: str  # the name ``stage.objective`` selects it by
    # What an exported ``model.safetensors`` holds (its metadata "kind"): "siglip" or "pali3".
    export_kind: str
    # The model the trainer wraps, whole and on one device; parallelism is applied from outside.
    build_model: Callable[[ModelConfig], nn.Module]
    # The training loss of one model-ready micro-batch (images normalised, on the device).
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    # FLOPs of one sample (``engine.flops``): the trainer's MFU and HFU, the planner's step time.
    flops: Callable[[Config], "SampleFlops"]
    # Tokens per sample by tower input ({"image": 256, "text": 64}): the dry run, the planner.
    tokens_per_sample: Callable[[Config], dict[str, int]]
    # Tokens a micro-batch feeds the model, {"visual": ..., "text": ...} (the trainer's tokens/s).
    batch_tokens: Callable[[Config, Batch], dict[str, int]]
    # Metrics logged each step besides the engine's (SigLIP's temperature and bias).
    step_metrics: Callable[[nn.Module, Config, float], dict[str, float]]
    # The held-out evaluators of ``cfg.eval`` for this objective.
    evaluators: Callable[[Config, "EvalContext"], list["Evaluator"]]
    # Activation memory of one micro-batch (``engine.memory``), for the meta-device model.
    activations: Callable[[Config, nn.Module], "Activations"]
    # Pre-launch checks of the config (file ``where``) against the objective: raise
    # ``ConfigError`` for what would be wrong; return a warning per setting it would ignore.
    check: Callable[[Config, str], Sequence[str]]
    # ``init_from`` weights of an exported kind -> this model's names (SigLIP -> PaLI-3's ViT).
    adapt_weights: Callable[[StateDict, str | None], StateDict]
    # False: gradient accumulation is refused (SigLIP's loss needs the whole contrastive batch
    # in one micro-step); the planner then keeps accumulation 1.
    accumulates: bool = True


def visual_tokens(cfg: Config, batch: Batch) -> int:
    """Patch tokens of ``batch``'s images, or of its clips' real frames (padded frames are
    masked out): every image or frame is cut into the config's grid."""
    images = len(batch.images) if batch.frame_mask is None else int(batch.frame_mask.sum())
    return images * cfg.model.vit.num_patches
