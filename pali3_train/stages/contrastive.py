"""Stage 0, SigLIP pretraining: the ViT and a text tower learn from image-caption pairs with the
sigmoid loss, chunked around the data-parallel ring (``losses.siglip_ring``); evaluated by
retrieval and zero-shot classification; exported as a SigLIP file whose image tower the
generative stages start from."""

from __future__ import annotations

import torch
from torch import nn

from pali3_train.config import Config, ConfigError
from pali3_train.config.schema import VIDEO_TASKS, DataConfig, EvalConfig, has_video
from pali3_train.convert.safetensors_io import StateDict
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.engine.flops import SampleFlops, Tally, map_head, text_tower, vit
from pali3_train.engine.memory import Activations, tower, trains
from pali3_train.eval.embeddings import EmbeddingEvaluator
from pali3_train.eval.evaluator import EvalContext, Evaluator, held_out
from pali3_train.losses.siglip_ring import ring_sigmoid_loss
from pali3_train.models import SigLIP
from pali3_train.stages.spec import StageSpec, visual_tokens

EXPORT_KIND = "siglip"


class ContrastiveSigLIP(SigLIP):
    """SigLIP whose forward returns the sigmoid loss of every image of the data-parallel batch
    against every text, chunked around the data-parallel ring (tensor-parallel peers hold the
    same pairs and stay out of it). The loss is computed inside forward so that ZeRO-3 gathers
    the temperature and bias like every other weight; the state dict is SigLIP's."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # Imported here: megatron-core loads with it, and config validation reads this module.
        from pali3_train.parallel import dp_group

        image_emb, text_emb = self.embed_images(images), self.embed_texts(tokens)
        return ring_sigmoid_loss(
            image_emb, text_emb, self.logit_scale(), self.logit_bias(), group=dp_group(),
            kernel=self.ring_loss,
        )  # fmt: skip


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch.images, batch.target)


def flops(cfg: Config) -> SampleFlops:
    """Both towers, and the sigmoid loss's logits: each image against every text of the global
    batch (micro x DP, accumulation being 1), 2 x width FLOPs a pair."""
    t, vit_cfg = Tally(cfg.stage.freeze), cfg.model.vit
    image = map_head(t, "image_head", vit_cfg, vit(t, "image", vit_cfg))
    text = text_tower(t, "text", cfg.model.text, cfg.data.max_target_tokens, vit_cfg.width)
    t.product(2 * vit_cfg.width * cfg.train.global_batch_size, image, text)
    return t.result()


def tokens_per_sample(cfg: Config) -> dict[str, int]:
    return {"image": cfg.model.vit.num_patches, "text": cfg.data.max_target_tokens}


def batch_tokens(cfg: Config, batch: Batch) -> dict[str, int]:
    """Captions are the text side: their real (unpadded) tokens."""
    return {"visual": visual_tokens(cfg, batch), "text": int(batch.target_mask.sum())}


def step_metrics(model: nn.Module, cfg: Config, seconds: float) -> dict[str, float]:
    return {
        "temperature": model.logit_scale().exp().item(),
        "bias": model.logit_bias().item(),
        "pairs_per_s": cfg.train.global_batch_size**2 / seconds,
    }


def evaluators(cfg: Config, ctx: EvalContext) -> list[Evaluator]:
    return [
        EmbeddingEvaluator(
            source.name,
            held_out(cfg, source, ctx, cfg.eval.batch_size),
            ctx.tokenizer,
            tuple(t for t in cfg.eval.zero_shot if t.source == source.name),
            cfg.data.max_target_tokens,
        )
        for source in cfg.eval.sources
    ]


def activations(cfg: Config, model: nn.Module) -> Activations:
    vit, text, target = cfg.model.vit, cfg.model.text, cfg.data.max_target_tokens
    image_keeps = trains(model.image, model.image_head)
    return Activations(
        (
            tower(cfg, "image tower", vit.depth, vit.num_patches, vit.width, image_keeps),
            tower(cfg, "text tower", text.depth, target, text.width, trains(model.text)),
        ),
        logits=0.0,
    )


# Settings that only the generative objective reads, with why they do not apply here.
IGNORED = {
    "data.max_prompt_tokens": "prompts are not fed to the model",
    "eval.beam_size": "nothing is decoded",
    "eval.max_decode_tokens": "nothing is decoded",
}


def check(cfg: Config, where: str) -> list[str]:
    if has_video(cfg.data):
        raise ConfigError(
            where,
            "data.sources",
            "video tasks train PaLI-3 (stage.objective: generative); SigLIP embeds one image "
            "per text",
            also=("stage.objective",),
        )
    # Held-out sources too: a clip would reach the image tower at the first evaluation.
    for i, source in enumerate(cfg.eval.sources):
        if source.task in VIDEO_TASKS:
            raise ConfigError(
                where,
                f"eval.sources[{i}].task",
                f"{source.task} is evaluated by PaLI-3 (stage.objective: generative); SigLIP "
                "embeds one image per text",
                also=("stage.objective",),
            )
    if cfg.data.max_target_tokens > cfg.model.text.max_len:
        raise ConfigError(
            where,
            "data.max_target_tokens",
            f"{cfg.data.max_target_tokens} exceeds the text tower's "
            f"model.text.max_len={cfg.model.text.max_len} (the contrastive objective encodes "
            "targets)",
            also=("model.text.max_len",),
        )
    defaults = {"data": DataConfig(), "eval": EvalConfig()}
    warnings = []
    for dotted, why in IGNORED.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != getattr(defaults[section], name):
            warnings.append(f"{dotted}={value} is ignored by the contrastive objective: {why}")
    for i, source in enumerate(cfg.data.sources):
        if source.prompt is not None:
            warnings.append(
                f"data.sources[{i}].prompt is ignored by the contrastive objective: it pairs "
                "images with targets only"
            )
    return warnings


def adapt_weights(state: StateDict, kind: str | None) -> StateDict:
    return state  # SigLIP's own names; anything else fails as weights the model lacks


CONTRASTIVE = StageSpec(
    objective="contrastive",
    export_kind=EXPORT_KIND,
    build_model=ContrastiveSigLIP,
    loss=loss,
    flops=flops,
    tokens_per_sample=tokens_per_sample,
    batch_tokens=batch_tokens,
    step_metrics=step_metrics,
    evaluators=evaluators,
    activations=activations,
    check=check,
    adapt_weights=adapt_weights,
    accumulates=False,
)
