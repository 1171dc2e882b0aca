"""Stages 1, 2 and transfer: PaLI-3 (ViT tokens projected and prepended to the prompt, UL2
generating the answer) trained by token cross-entropy on the task mixture, evaluated by scoring
generated answers, exported as a PaLI-3 file that generation and the next stage read.

A mixture with a video source makes every sample a clip of ``data.max_frames`` frames (an image
is a clip of one): the ViT then runs over every frame, padded ones too, and the encoder reads
all their tokens, so the FLOPs and activations count F x tokens-per-frame visual tokens."""

from __future__ import annotations

import torch
from torch import nn

from pali3_train.config import Config, ConfigError
from pali3_train.config.schema import has_video
from pali3_train.convert.rename import StateDict, add_prefix, strip_prefix
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.engine.flops import SampleFlops, Tally, ul2, vit
from pali3_train.engine.memory import (
    BYTES,
    Activations,
    cross_entropy_bytes,
    planned_kernels,
    tower,
    trains,
)
from pali3_train.eval.answers import AnswerEvaluator
from pali3_train.eval.evaluator import EvalContext, Evaluator, held_out
from pali3_train.models import PaLI3
from pali3_train.stages.contrastive import EXPORT_KIND as SIGLIP_KIND
from pali3_train.stages.spec import StageSpec, visual_tokens

EXPORT_KIND = "pali3"


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(
        batch.images,
        batch.prompt,
        batch.prompt_mask,
        batch.target,
        batch.target_mask,
        frame_mask=batch.frame_mask,
    ).loss


def frames(cfg: Config) -> int:
    """Images through the ViT per sample: a clip's ``data.max_frames`` when the mixture holds a
    video source (padded frames are computed, then masked), else the one image."""
    return cfg.data.max_frames if has_video(cfg.data) else 1


def tokens_per_sample(cfg: Config) -> dict[str, int]:
    data = cfg.data
    return {
        "image": frames(cfg) * cfg.model.vit.num_patches,
        "prompt": data.max_prompt_tokens,
        "target": data.max_target_tokens,
    }


def batch_tokens(cfg: Config, batch: Batch) -> dict[str, int]:
    """The text side is the real (unpadded) prompt and target tokens."""
    text = int(batch.prompt_mask.sum() + batch.target_mask.sum())
    return {"visual": visual_tokens(cfg, batch), "text": text}


def flops(cfg: Config) -> SampleFlops:
    """The ViT over each frame's patches, the projection, UL2 over all frames' patches + prompt
    and the target. (The temporal embedding is an addition: no product.)"""
    t, vit_cfg, ul2_cfg, data = Tally(cfg.stage.freeze), cfg.model.vit, cfg.model.ul2, cfg.data
    patches = frames(cfg) * vit_cfg.num_patches
    with t.repeated(frames(cfg)):
        tokens = vit(t, "vit", vit_cfg)
    visual = t.linear("projection", tokens, patches, vit_cfg.width, ul2_cfg.d_model, bias=True)
    visual = visual or (cfg.model.temporal_embedding and t.trains("temporal_embed"))
    ul2(t, "ul2", ul2_cfg, visual, patches, data.max_prompt_tokens, data.max_target_tokens)
    return t.result()


def step_metrics(model: nn.Module, cfg: Config, seconds: float) -> dict[str, float]:
    return {}


def evaluators(cfg: Config, ctx: EvalContext) -> list[Evaluator]:
    opts = cfg.eval
    return [
        AnswerEvaluator(
            source.name,
            source.task,
            held_out(cfg, source, ctx, opts.batch_size * ctx.dp_size),
            ctx,
            opts.batch_size,
            opts.max_decode_tokens,
            opts.beam_size,
        )
        for source in opts.sources
    ]


def activations(cfg: Config, model: nn.Module) -> Activations:
    b, t, w = (
        cfg.train.micro_batch_size,
        cfg.parallel.tensor_parallel_size,
        BYTES[cfg.train.precision],
    )
    vit, ul2, target = cfg.model.vit, cfg.model.ul2, cfg.data.max_target_tokens
    seq = frames(cfg) * vit.num_patches + cfg.data.max_prompt_tokens
    # A tower keeps activations if it trains or a gradient must pass through it to one that does.
    vit_keeps = trains(model.vit)
    before_encoder = (model.projection, model.temporal_embed, model.ul2.embed)
    enc_keeps = vit_keeps or trains(*filter(None, before_encoder), model.ul2.encoder_layers)
    dec_keeps = enc_keeps or trains(model.ul2.decoder_layers, model.ul2.lm_head)
    bias = b * (ul2.num_heads // t) * seq**2 * w  # [b, heads/t, s, s], shared by all layers
    cross_kv = ul2.num_decoder_layers * 2 * b * seq * ul2.num_heads * ul2.d_kv / t * w
    kernels = planned_kernels(cfg)
    loss = cross_entropy_bytes(kernels.cross_entropy, b * target, ul2.vocab_size // t,
                               ul2.d_model, kernels.cross_entropy_chunk_tokens,
                               cfg.train.precision)  # fmt: skip
    return Activations(
        (
            tower(
                cfg, "vit", vit.depth, vit.num_patches, vit.width, vit_keeps, per_sample=frames(cfg)
            ),  # fmt: skip
            tower(cfg, "ul2 encoder", ul2.num_encoder_layers, seq, ul2.d_model, enc_keeps, bias),
            tower(
                cfg, "ul2 decoder", ul2.num_decoder_layers, target, ul2.d_model, dec_keeps, cross_kv
            ),  # fmt: skip
        ),
        logits=loss if dec_keeps else 0.0,
        loss_path=kernels.cross_entropy,
    )


def check(cfg: Config, where: str) -> list[str]:
    if cfg.eval.zero_shot:
        raise ConfigError(
            where,
            "eval.zero_shot",
            "zero-shot classification scores SigLIP embeddings; the generative objective is "
            "evaluated by its answers (remove eval.zero_shot, or set stage.objective: "
            "contrastive)",
            also=("stage.objective",),
        )
    return []


def adapt_weights(state: StateDict, kind: str | None) -> StateDict:
    """A SigLIP file gives PaLI-3 its image tower (its MAP head and text tower have no place in
    PaLI-3); an imported T5/UL2 file gives it the encoder-decoder; PaLI-3's own load as they are."""
    if kind == SIGLIP_KIND:
        return add_prefix(strip_prefix(state, "image."), "vit.")
    if kind == "t5":
        return add_prefix(state, "ul2.")
    return state


GENERATIVE = StageSpec(
    objective="generative",
    export_kind=EXPORT_KIND,
    build_model=PaLI3,
    loss=loss,
    flops=flops,
    tokens_per_sample=tokens_per_sample,
    batch_tokens=batch_tokens,
    step_metrics=step_metrics,
    evaluators=evaluators,
    activations=activations,
    check=check,
    adapt_weights=adapt_weights,
)
