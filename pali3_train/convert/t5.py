"""T5 v1.1 / UL2 checkpoints (HuggingFace ``T5ForConditionalGeneration`` layout) <-> our ``UL2``.

HF stores the relative-position table inside the first block of each stack and repeats the shared
embedding as ``encoder.embed_tokens`` / ``decoder.embed_tokens``; we keep one of each, and write the
copies back on export so that the files load like published ones. HF's separate q/k/v and
wi_0/wi_1 are renamed to our separate names (``RULES``) and fused (``convert/fusion.py``): the
encoder's q/k/v into one weight, the decoder's k/v (its queries are projected apart), gate/up.
The head size comes from the file itself: the relative-position table has a column per head.

Our LM head is always its own weight. A checkpoint whose head is tied to ``shared`` (transformers 5
ties it on every T5 and saves no ``lm_head.weight``) gets a copy of the embedding; where the
config says HF scales the decoder output by ``d_model**-0.5`` before the head (original T5,
``scale_decoder_outputs``), the scale is folded into the copied head, which is the same product.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from pali3_train.config import UL2Config
from pali3_train.convert.fusion import fuse_projections, split_projections
from pali3_train.convert.rename import StateDict, rename

log = logging.getLogger(__name__)
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_ATTN = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))
_FF = (("wi_0", "wi_gate"), ("wi_1", "wi_up"), ("wo", "wo"))


def _attention(hf: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{hf}.{a}.weight", f"{ours}.{b}.weight") for a, b in _ATTN]


def _feed_forward(hf: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{hf}.DenseReluDense.{a}.weight", f"{ours}.{b}.weight") for a, b in _FF]


_ENC, _DEC = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
RULES = [
    ("shared.weight", "embed.weight"),
    ("lm_head.weight", "lm_head.weight"),
    (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder_bias.embed.weight",
    ),
    (
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder_bias.embed.weight",
    ),
    *_attention(f"{_ENC}.0.SelfAttention", "encoder_layers.{i}.attn"),
    (f"{_ENC}.0.layer_norm.weight", "encoder_layers.{i}.norm_attn.weight"),
    *_feed_forward(f"{_ENC}.1", "encoder_layers.{i}.ff"),
    (f"{_ENC}.1.layer_norm.weight", "encoder_layers.{i}.norm_ff.weight"),
    ("encoder.final_layer_norm.weight", "encoder_norm.weight"),
    *_attention(f"{_DEC}.0.SelfAttention", "decoder_layers.{i}.self_attn"),
    (f"{_DEC}.0.layer_norm.weight", "decoder_layers.{i}.norm_self.weight"),
    *_attention(f"{_DEC}.1.EncDecAttention", "decoder_layers.{i}.cross_attn"),
    (f"{_DEC}.1.layer_norm.weight", "decoder_layers.{i}.norm_cross.weight"),
    *_feed_forward(f"{_DEC}.2", "decoder_layers.{i}.ff"),
    (f"{_DEC}.2.layer_norm.weight", "decoder_layers.{i}.norm_ff.weight"),
    ("decoder.final_layer_norm.weight", "decoder_norm.weight"),
]


def ul2_from_hf(
    hf_state: Mapping[str, torch.Tensor], hf_cfg: Mapping[str, Any] | None = None
) -> StateDict:
    """HF T5 state dict -> our ``UL2`` state dict. Without its ``config.json`` (``hf_cfg``) the
    LM head must be in the state dict and is taken as it is; with it, a tied head (no
    ``lm_head.weight``) is copied from ``shared`` and HF's output scale folded in (module doc)."""
    state = {k: v for k, v in hf_state.items() if k not in _TIED_COPIES}
    notes = []
    if "lm_head.weight" not in state:
        if hf_cfg is None or hf_cfg.get("tie_word_embeddings", True) is False:
            raise KeyError(
                "lm_head.weight missing and the config does not tie it to shared.weight "
                "(tie_word_embeddings): the checkpoint lacks its LM head"
            )
        state["lm_head.weight"] = state["shared.weight"].clone()
        notes.append("the LM head is tied to shared.weight: copied into our own head")
    if hf_cfg is not None and _scales_decoder_output(hf_cfg):
        scale = hf_cfg["d_model"] ** -0.5
        state["lm_head.weight"] = state["lm_head.weight"] * scale
        notes.append(
            f"HF scales the decoder output by d_model**-0.5 = {scale:.6g} before the head "
            "(scale_decoder_outputs / tie_word_embeddings): folded into lm_head.weight"
        )
    for note in notes:  # a warning: the command line shows it
        log.warning("T5 import: %s", note)
    state = rename(state, RULES, to_hf=False)
    head_dim = _head_dim(state)
    return fuse_projections(state, lambda _: head_dim, joint=_encoder_attention)


def ul2_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    head_dim = _head_dim(state)
    hf = rename(split_projections(state, lambda _: head_dim), RULES, to_hf=True)
    for name in _TIED_COPIES:
        hf[name] = hf["shared.weight"]
    return hf


def _scales_decoder_output(cfg: Mapping[str, Any]) -> bool:
    """Whether HF's T5 multiplies the decoder output by ``d_model**-0.5`` before the LM head:
    transformers 5 saves the answer (``scale_decoder_outputs``); older configs imply it by
    ``tie_word_embeddings``, true unless set false (HF's default), as transformers 5 reads them."""
    if "scale_decoder_outputs" in cfg:
        return bool(cfg["scale_decoder_outputs"])
    return cfg.get("tie_word_embeddings", True) is not False


def _encoder_attention(module: str) -> bool:
    """Whether ``module`` takes q, k and v from one input: the encoder's self-attention. The
    decoder's self-attention caches its keys and values, its cross-attention takes them from the
    encoder: both project them apart from the queries."""
    return module.startswith("encoder_layers.")


def _head_dim(state: Mapping[str, torch.Tensor]) -> int:
    """d_kv, from our names: the attention width (any out_proj's input features) over the heads
    (the relative-position table's columns)."""
    heads = state["encoder_bias.embed.weight"].shape[1]
    inner = next(v for k, v in state.items() if k.endswith(".out_proj.weight")).shape[1]
    return inner // heads


def ul2_config_from_hf(cfg: Mapping[str, Any]) -> UL2Config:
    """From a T5 ``config.json``; ``feed_forward_proj`` must be gated (v1.1 / UL2)."""
    feed_forward = cfg.get("feed_forward_proj", "relu")
    if feed_forward not in ("gated-gelu", "gated-silu"):
        raise ValueError(
            f"feed_forward_proj={feed_forward!r}: only the gated T5 v1.1 / UL2 "
            f"variants (gated-gelu, gated-silu) are supported"
        )
    return UL2Config(
        vocab_size=cfg["vocab_size"],
        d_model=cfg["d_model"],
        num_heads=cfg["num_heads"],
        d_kv=cfg["d_kv"],
        d_ff=cfg["d_ff"],
        num_encoder_layers=cfg["num_layers"],
        num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
        feed_forward=feed_forward,
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        pad_id=cfg.get("pad_token_id", 0),
        eos_id=cfg.get("eos_token_id", 1),
    )


def hf_config(cfg: UL2Config) -> dict[str, Any]:
    """A T5 v1.1-style ``config.json`` (untied LM head, as published UL2/T5 v1.1 files)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "feed_forward_proj": cfg.feed_forward,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "dropout_rate": 0.0,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": cfg.eos_id,
        "decoder_start_token_id": cfg.pad_id,
        "tie_word_embeddings": False,
        "is_encoder_decoder": True,
    }
