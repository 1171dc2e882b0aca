"""SigLIP checkpoints (HuggingFace ``SiglipModel`` layout) <-> our ``SigLIP`` two-tower model.

Published checkpoints nest the towers under ``vision_model.`` / ``text_model.``; a vision-only
state dict (``SiglipVisionModel``'s: transformers 5 saves it without the ``vision_model.`` prefix,
older versions with it) converts too, into the image tower and MAP head alone.
HF keeps the MAP head's attention as ``nn.MultiheadAttention`` (one in-projection, [q; k; v]) and
the towers' q/k/v as separate projections. Both are renamed to our separate names (``RULES``) and
fused in our layout (``convert/fusion.py``): the towers' q/k/v into one weight each, the MAP head's
k/v (its probe's query is projected apart). That layout orders rows by head, so converting needs
each tower's head count, which a SigLIP checkpoint does not hold: the configs are passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Mapping

import torch

from pali3_train.config import TextConfig, ViTConfig
from pali3_train.convert.fusion import fuse_projections, split_projections
from pali3_train.convert.rename import StateDict, rename
from pali3_train.models.siglip import BIAS_INIT, LOG_TEMPERATURE_INIT

_IN_PROJ = "vision_model.head.attention.in_proj_"
_QKV = ("q_proj", "k_proj", "v_proj")
# HF holds t' and b themselves; we hold their offsets from the initialisation (``models.siglip``).
_SCALARS = {"logit_scale": LOG_TEMPERATURE_INIT, "logit_bias": BIAS_INIT}


def _affine(hf: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{hf}.weight", f"{ours}.weight"), (f"{hf}.bias", f"{ours}.bias")]


def _encoder_rules(hf: str, ours: str) -> list[tuple[str, str]]:
    layer, block = f"{hf}encoder.layers.{{i}}.", f"{ours}encoder.blocks.{{i}}."
    rules = _affine(layer + "layer_norm1", block + "norm1") + _affine(
        layer + "layer_norm2", block + "norm2"
    )
    for proj in (*_QKV, "out_proj"):
        rules += _affine(f"{layer}self_attn.{proj}", f"{block}attn.{proj}")
    for fc in ("fc1", "fc2"):
        rules += _affine(f"{layer}mlp.{fc}", f"{block}mlp.{fc}")
    return rules


RULES = [
    *_affine("vision_model.embeddings.patch_embedding", "image.patch_embed"),
    ("vision_model.embeddings.position_embedding.weight", "image.pos_embed"),
    *_encoder_rules("vision_model.", "image."),
    *_affine("vision_model.post_layernorm", "image.encoder.norm"),
    ("vision_model.head.probe", "image_head.probe"),
    *[
        rule
        for proj in (*_QKV, "out_proj")
        for rule in _affine(f"vision_model.head.attention.{proj}", f"image_head.attn.{proj}")
    ],
    *_affine("vision_model.head.layernorm", "image_head.norm"),
    *_affine("vision_model.head.mlp.fc1", "image_head.mlp.fc1"),
    *_affine("vision_model.head.mlp.fc2", "image_head.mlp.fc2"),
    ("text_model.embeddings.token_embedding.weight", "text.token_embed.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
    *_encoder_rules("text_model.", "text."),
    *_affine("text_model.final_layer_norm", "text.encoder.norm"),
    *_affine("text_model.head", "text.head"),
    *[(name, f"{name}_offset") for name in _SCALARS],
]


def siglip_from_hf(
    hf_state: Mapping[str, torch.Tensor], vit: ViTConfig, text: TextConfig | None = None
) -> StateDict:
    """HF ``SiglipModel`` state dict -> our ``SigLIP`` state dict (``text`` may be left out for a
    vision-only one). ``position_ids`` buffers are not weights and are dropped."""
    state = {k: v for k, v in hf_state.items() if not k.endswith("position_ids")}
    if text is None:  # a vision-only model's own names may lack the prefix
        state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v
                 for k, v in state.items()}  # fmt: skip
    for kind in ("weight", "bias"):
        fused = state.pop(_IN_PROJ + kind, None)
        if fused is not None:
            for proj, part in zip(_QKV, fused.chunk(3)):
                state[f"vision_model.head.attention.{proj}.{kind}"] = part
    state = _shift_scalars(state, -1)
    state = rename(state, RULES, to_hf=False)
    return fuse_projections(state, _head_dims(vit, text), joint=_tower_attention)


def siglip_to_hf(
    state: Mapping[str, torch.Tensor], vit: ViTConfig, text: TextConfig | None = None
) -> StateDict:
    """Our ``SigLIP`` state dict -> HF ``SiglipModel`` layout (as published checkpoints are)."""
    hf = rename(split_projections(state, _head_dims(vit, text)), RULES, to_hf=True)
    for kind in ("weight", "bias"):
        parts = [hf.pop(f"vision_model.head.attention.{proj}.{kind}", None) for proj in _QKV]
        if all(p is not None for p in parts):
            hf[_IN_PROJ + kind] = torch.cat(parts)
    return _shift_scalars(hf, +1)


def _shift_scalars(hf_named: Mapping[str, torch.Tensor], sign: int) -> StateDict:
    """Add (+1: offsets -> values) or subtract (-1) the initial t' and b, in the tensors' dtype."""
    out = dict(hf_named)
    for name, init in _SCALARS.items():
        if name in out:
            out[name] = out[name] + sign * init
    return out


def _tower_attention(module: str) -> bool:
    """Whether ``module`` takes q, k and v from one input: every tower block's self-attention,
    not the MAP head's (its probe queries the image tokens)."""
    return not module.startswith("image_head.")


def _head_dims(vit: ViTConfig, text: TextConfig | None) -> Callable[[str], int]:
    def head_dim(module: str) -> int:
        if module.startswith("text."):
            if text is None:
                raise ValueError(f"{module}: converting the text tower needs its config")
            return text.width // text.num_heads
        return vit.width // vit.num_heads

    return head_dim


def vit_config_from_hf(vision: Mapping[str, Any]) -> ViTConfig:
    """From the ``vision_config`` of a SigLIP ``config.json``."""
    return ViTConfig(
        image_size_px=vision["image_size"],
        patch_size_px=vision["patch_size"],
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
    )


def text_config_from_hf(text: Mapping[str, Any]) -> TextConfig:
    """From the ``text_config`` of a SigLIP ``config.json``. Its ``projection_size`` is the
    image embedding's size, which our model takes from ``vit.width``."""
    return TextConfig(
        vocab_size=text["vocab_size"],
        max_len=text["max_position_embeddings"],
        width=text["hidden_size"],
        depth=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"],
        mlp_dim=text["intermediate_size"],
        layer_norm_eps=text.get("layer_norm_eps", 1e-6),
    )


def is_vision_only(hf_cfg: Mapping[str, Any]) -> bool:
    """Whether a SigLIP ``config.json`` is a ``SiglipVisionModel``'s: the vision fields at its top
    level instead of under ``vision_config``."""
    return "vision_config" not in hf_cfg and (
        hf_cfg.get("model_type") == "siglip_vision_model" or "patch_size" in hf_cfg
    )


def hf_config(vit: ViTConfig, text: TextConfig | None) -> dict[str, Any]:
    """A ``config.json`` that HF's ``SiglipModel.from_pretrained`` reads, or without ``text``
    ``SiglipVisionModel.from_pretrained``."""
    common = {"hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0}
    vision = {
        **common,
        "model_type": "siglip_vision_model",
        "image_size": vit.image_size_px,
        "patch_size": vit.patch_size_px,
        "hidden_size": vit.width,
        "num_hidden_layers": vit.depth,
        "num_attention_heads": vit.num_heads,
        "intermediate_size": vit.mlp_dim,
        "layer_norm_eps": vit.layer_norm_eps,
        "num_channels": 3,
    }
    if text is None:
        return {"architectures": ["SiglipVisionModel"], **vision}
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "vision_config": vision,
        "text_config": {
            **common,
            "model_type": "siglip_text_model",
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_len,
            "hidden_size": text.width,
            "num_hidden_layers": text.depth,
            "num_attention_heads": text.num_heads,
            "intermediate_size": text.mlp_dim,
            "projection_size": vit.width,
            "layer_norm_eps": text.layer_norm_eps,
        },
    }
