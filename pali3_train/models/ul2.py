"""UL2: a T5 v1.1-style encoder-decoder (RMSNorm, relative position buckets, gated feed-forward,
no biases, untied LM head).

The encoder takes embeddings rather than tokens so that PaLI-3 can prepend visual tokens to the
embedded prompt. The decoder can run over a whole target (teacher forcing) or one step at a time
with a key/value cache (generation); ``DecoderState`` carries what those steps share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pali3_train.config import UL2Config
from pali3_train.models import projections
from pali3_train.models.attention import KV, MultiHeadAttention, padding_bias
from pali3_train.models.flex_bias import (
    FlexBias,
    block_mask,
    causal,
    key_padding,
    relative_score_mod,
)
from pali3_train.models.fused import RMSNorm, gated_activation
from pali3_train.models.projections import FusedLinear, Projections, project


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of (key position - query position): exact buckets for short distances,
    logarithmically wider ones up to ``max_distance``, one shared bucket beyond. The causal decoder
    only sees the past, so it spends all buckets on non-positive offsets."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(
        max_distance / max_exact
    )
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention logits of every layer."""

    def __init__(self, cfg: UL2Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.embed = nn.Embedding(self.num_buckets, cfg.num_heads)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """-> [1, H, q_len, k_len] for queries at positions q_offset .. q_offset + q_len - 1."""
        device = self.embed.weight.device
        q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(
            k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embed(buckets).permute(2, 0, 1)[None]

    def per_offset(self, q_len: int, k_len: int) -> torch.Tensor:
        """-> [q_len + k_len - 1, H]: row o + q_len - 1 holds the bias of key - query offset o,
        for queries at 0 .. q_len - 1. What FlexAttention's ``score_mod`` indexes: the same values
        as ``forward`` without the [q_len, k_len] grid. Looked up through the embedding module
        (not its weight), so that ZeRO-3 gathers the table."""
        offsets = torch.arange(1 - q_len, k_len, device=self.embed.weight.device)
        buckets = relative_position_bucket(
            offsets, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embed(buckets)


class FeedForward(nn.Module):
    """wo(act(gate) * up), gate and up from one GEMM: ``wi``'s rows are [hidden unit, {gate, up}]
    (``models/projections.py``)."""

    def __init__(self, cfg: UL2Config):
        super().__init__()
        self.kind = cfg.feed_forward
        # "fused" | "separate" (one GEMM each for gate and up; ``pali3_train.kernels`` sets it)
        self.projections: Projections = "fused"
        self.wi = FusedLinear(cfg.d_model, cfg.d_ff, 2, 1, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (h.flatten(-2) for h in project(self.wi, x, 2, 1, self.projections))
        return self.wo(gated_activation(gate, up, self.kind))


def _attention(cfg: UL2Config, joint_qkv: bool = True) -> MultiHeadAttention:
    # T5 does not scale logits by 1/sqrt(d_kv); its initialisation accounts for it.
    return MultiHeadAttention(
        cfg.d_model, cfg.num_heads, cfg.d_kv, bias=False, scale=1.0, joint_qkv=joint_qkv
    )


class EncoderLayer(nn.Module):
    def __init__(self, cfg: UL2Config):
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = _attention(cfg)
        self.norm_ff = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), bias=bias)
        return x + self.ff(self.norm_ff(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: UL2Config):
        super().__init__()
        self.norm_self = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.self_attn = _attention(cfg, joint_qkv=False)  # its keys/values are cached
        self.norm_cross = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.cross_attn = _attention(cfg, joint_qkv=False)
        self.norm_ff = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        cross_kv: KV,
        cross_bias: torch.Tensor,
        past_kv: KV | None,
    ) -> tuple[torch.Tensor, KV]:
        """Returns the new hidden states and this layer's self-attention keys/values including
        ``past_kv`` (what a cache keeps for the next step)."""
        h = self.norm_self(x)
        k, v = self.self_attn.project_kv(h)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        x = x + self.self_attn(h, kv=(k, v), bias=self_bias)
        x = x + self.cross_attn(self.norm_cross(x), kv=cross_kv, bias=cross_bias)
        return x + self.ff(self.norm_ff(x)), (k, v)


@dataclass
class DecoderState:
    """What successive decoder calls share: cross-attention keys/values of the encoder output
    (computed once), its padding bias, and, when caching, each layer's self-attention cache."""

    cross_kv: list[KV]
    cross_bias: torch.Tensor
    memory_mask: torch.Tensor  # [B, L]; FlexAttention builds its block mask from it
    self_kv: list[KV] | None  # None: no cache, every call decodes the whole prefix
    length: int = 0  # tokens already in the cache

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the cache (beam search regroups hypotheses every step)."""
        if self.self_kv is not None:
            self.self_kv = [(k[index], v[index]) for k, v in self.self_kv]


class UL2(nn.Module):
    def __init__(self, cfg: UL2Config):
        super().__init__()
        self.cfg = cfg
        # "sdpa": dense biases; "flex": FlexAttention (``pali3_train.kernels`` sets it)
        self.attention = "sdpa"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder and decoder
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)
        )
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)
        )
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mesh-TensorFlow T5's scheme: unit-variance inputs to every projection, with the query
        absorbing the 1/sqrt(d_kv) that attention does not apply."""
        cfg = self.cfg
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=cfg.d_model**-0.5)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                q_std, kv_std = (cfg.d_model * cfg.d_kv) ** -0.5, cfg.d_model**-0.5
                if module.joint_qkv:
                    # through its module, which ZeRO-3's partitioned construction redirects
                    stds = (q_std, kv_std, kv_std)
                    projections.normal_parts_(module.qkv_proj.weight, stds, cfg.d_kv)
                else:
                    nn.init.normal_(module.q_proj.weight, std=q_std)
                    nn.init.normal_(module.kv_proj.weight, std=kv_std)
                nn.init.normal_(module.out_proj.weight, std=(cfg.num_heads * cfg.d_kv) ** -0.5)
            elif isinstance(module, FeedForward):
                nn.init.normal_(module.wi.weight, std=cfg.d_model**-0.5)  # gate and up alike
                nn.init.normal_(module.wo.weight, std=cfg.d_ff**-0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.embed.weight, std=cfg.d_model**-0.5)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d_model] embeddings, mask [B, L] (True = real) -> hidden [B, L, d_model]."""
        length = x.shape[1]
        if self.attention == "flex":
            bias = FlexBias(
                relative_score_mod(self.encoder_bias.per_offset(length, length), length),
                block_mask(key_padding(mask), len(mask), length, length, mask.device),
            )
        else:
            bias = self.encoder_bias(length, length) + padding_bias(mask, x.dtype)
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return self.encoder_norm(x)

    def start_decoding(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, use_cache: bool
    ) -> DecoderState:
        """memory [B, L, d_model] = encoder output, memory_mask [B, L]."""
        return DecoderState(
            cross_kv=[layer.cross_attn.project_kv(memory) for layer in self.decoder_layers],
            cross_bias=padding_bias(memory_mask, memory.dtype),
            memory_mask=memory_mask,
            self_kv=[] if use_cache else None,
        )

    def decode(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. With a cache, ``tokens`` continue the cached
        prefix; without one, they are the whole decoder input."""
        return self.lm_head(self.decode_hidden(tokens, state))

    def decode_hidden(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """``decode`` short of the LM head: -> the normalised final hidden states [B, T, d_model].
        Training hands them with the head to the loss, which need not hold all the logits."""
        offset = state.length if state.self_kv is not None else 0
        q_len = tokens.shape[1]
        k_len = offset + q_len
        x = self.embed(tokens)
        self_bias, cross_bias = self._decoder_biases(state, offset, q_len, x.dtype)
        caching = state.self_kv is not None
        for i, layer in enumerate(self.decoder_layers):
            past = state.self_kv[i] if caching and state.length else None
            x, kv = layer(x, self_bias, state.cross_kv[i], cross_bias, past)
            if caching:
                state.self_kv[i : i + 1] = [kv]
        if caching:
            state.length = k_len
        return self.decoder_norm(x)

    def _decoder_biases(self, state: DecoderState, offset: int, q_len: int, dtype: torch.dtype):
        """(self-attention, cross-attention) biases for queries at offset .. offset + q_len - 1.
        FlexAttention serves teacher forcing; a step that extends a cache (generation, one query
        at a time) takes the dense biases."""
        k_len = offset + q_len
        if self.attention == "flex" and state.self_kv is None:
            memory_mask = state.memory_mask
            return (
                FlexBias(
                    relative_score_mod(self.decoder_bias.per_offset(q_len, k_len), q_len),
                    block_mask(causal, None, q_len, k_len, memory_mask.device),
                ),
                FlexBias(
                    None,
                    block_mask(
                        key_padding(memory_mask),
                        len(memory_mask),
                        q_len,
                        memory_mask.shape[1],
                        memory_mask.device,
                    ),
                ),
            )
        device = state.memory_mask.device
        q_pos = torch.arange(offset, k_len, device=device)[:, None]
        future = torch.arange(k_len, device=device)[None, :] > q_pos
        bias = self.decoder_bias(q_len, k_len, offset).masked_fill(future, torch.finfo(dtype).min)
        return bias, state.cross_bias

    def forward(
        self, input_tokens: torch.Tensor, input_mask: torch.Tensor, decoder_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Text-only teacher forcing: [B, L], [B, L], [B, T] -> logits [B, T, vocab]."""
        memory = self.encode(self.embed(input_tokens), input_mask)
        return self.decode(decoder_tokens, self.start_decoding(memory, input_mask, use_cache=False))


def shift_right(targets: torch.Tensor, start_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, t0, ..., t_{T-2}] (T5 starts with the pad id)."""
    start = torch.full_like(targets[:, :1], start_id)
    return torch.cat([start, targets[:, :-1]], dim=1)
