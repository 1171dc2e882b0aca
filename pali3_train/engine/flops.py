"""FLOPs of one training sample, worked out from the config: the trainer's TFLOP/s, MFU and HFU
and the capacity planner's step time.

Only matrix products count (2 x m x n x k each: every projection, attention's scores and
weighted sum, the convolution cutting patches, the LM head); norms, activations and softmax are
a rounding error at these widths. A sample is padded to the config's lengths, and the model
computes every position, so the count is of the padded shapes. Backward costs a product once
per operand that needs a gradient: once for a trainable weight (dW) and once for an input that
carries a gradient back (dX). So a trainable layer costs 3x its forward, a frozen one with
something trainable before it 2x (its input gradient), a frozen one with nothing trainable before
it (stage 1's ViT) only its forward; the first trainable layer after it 2x (no dX).

Two totals, as PaLM defines them (Chowdhery et al. 2022): **model FLOPs**, the arithmetic the
model needs, what MFU divides by the peak; **hardware FLOPs**, what the device executes, which
with activation checkpointing adds each checkpointed block's recomputed forward (HFU's).
Torch's non-reentrant checkpoint stops recomputing as soon as the backward has the tensors it
saved, which is just before the block's last product: that one is not redone. Kernel-internal
recompute (flash attention re-forming the scores in its backward) is in neither.
``tests/engine/test_flops.py`` holds both to torch's ``FlopCounterMode`` on the meta device.

The count is of the unsharded model: tensor parallelism splits it over the ranks, a few
replicated layers aside. Each objective composes the towers below in its spec
(``StageSpec.flops``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pali3_train.config import TextConfig, UL2Config, ViTConfig


@dataclass(frozen=True)
class SampleFlops:
    """One sample's forward and backward."""

    model: float  # no recompute: MFU's numerator
    recompute: float  # what activation checkpointing adds to it

    def hardware(self, checkpointing: bool) -> float:
        """What the device executes (HFU's numerator)."""
        return self.model + (self.recompute if checkpointing else 0.0)


class Tally:
    """A sample's products, visited in forward order. An activation is represented only by
    whether it carries a gradient (a bool), which is all that decides the backward's cost."""

    def __init__(self, freeze: Sequence[str]):
        self.freeze = tuple(freeze)
        self.forward = self.backward = self.recompute = 0.0
        self._products: list[float] = []  # forward FLOPs of each product so far
        self._times = 1  # how many inputs each product runs over (``repeated``)

    def result(self) -> SampleFlops:
        return SampleFlops(self.forward + self.backward, self.recompute)

    def trains(self, path: str, *names: str) -> bool:
        """Whether any parameter ``path.name`` (or ``path`` itself) learns: ``stage.freeze``
        names modules or parameters, and freezes everything below them."""
        paths = [f"{path}.{n}" for n in names] or [path]
        return any(not any(p == f or p.startswith(f + ".") for f in self.freeze) for p in paths)

    @contextmanager
    def repeated(self, times: int) -> Iterator[None]:
        """Products inside run over ``times`` inputs of the shapes given (a video's frames, each
        through the ViT on its own): each costs, and recomputes, ``times`` times as much."""
        outer, self._times = self._times, self._times * times
        try:
            yield
        finally:
            self._times = outer

    def product(self, flops: float, *operands: bool) -> bool:
        """A product whose gradient-carrying ``operands`` each cost it once more in backward."""
        flops *= self._times
        self.forward += flops
        self.backward += flops * sum(operands)
        self._products.append(flops)
        return any(operands)

    def linear(self, path: str, x: bool, tokens: int, d_in: int, d_out: int, bias: bool) -> bool:
        weight = self.trains(path, "weight")
        out = self.product(2 * tokens * d_in * d_out, x, weight)
        return out or (bias and self.trains(path, "bias"))

    def checkpointed(self, block: Callable[[bool], bool], x: bool) -> bool:
        """``block`` as activation checkpointing runs it: a block whose output carries a
        gradient re-runs its forward in the backward pass, all but its last product."""
        start = len(self._products)
        out = block(x)
        if out:
            self.recompute += sum(self._products[start:-1])
        return out


# ------------------------------------------------------------------------ shared attention


def attention(t: Tally, path: str, q: bool, kv: bool, q_len: int, kv_len: int, dim: int,
              inner: int, bias: bool, joint: bool = False,
              kv_grads: tuple[bool, bool] | None = None, scores: bool = False) -> bool:  # fmt: skip
    """``MultiHeadAttention``: the q/k/v and out projections around scores and their weighted
    sum. ``joint``: q, k and v from one product (``qkv_proj``; self-attention over one input),
    otherwise ``q_proj`` and ``kv_proj``. ``kv_grads``: keys and values projected beforehand
    (UL2's cross-attention); ``scores``: whether a trainable bias is added to the scores (T5's
    relative positions)."""
    if joint:
        query = k = v = t.linear(f"{path}.qkv_proj", q, q_len, dim, 3 * inner, bias)
    else:
        k, v = kv_grads or (t.linear(f"{path}.kv_proj", kv, kv_len, dim, 2 * inner, bias),) * 2
        query = t.linear(f"{path}.q_proj", q, q_len, dim, inner, bias)
    weights = t.product(2 * q_len * kv_len * inner, query, k) or scores
    mixed = t.product(2 * q_len * kv_len * inner, weights, v)
    return t.linear(f"{path}.out_proj", mixed, q_len, inner, dim, bias)


# ----------------------------------------------------------------------------- SigLIP towers


def encoder(t: Tally, path: str, x: bool, tokens: int, width: int, depth: int, mlp: int) -> bool:
    """``transformer.Encoder``: pre-LayerNorm blocks, then a LayerNorm."""

    def block(x: bool, at: str) -> bool:
        h = x or t.trains(f"{at}.norm1")
        x = attention(t, f"{at}.attn", h, h, tokens, tokens, width, width, True, joint=True) or x
        h = x or t.trains(f"{at}.norm2")
        h = t.linear(f"{at}.mlp.fc1", h, tokens, width, mlp, bias=True)
        return t.linear(f"{at}.mlp.fc2", h, tokens, mlp, width, bias=True) or x

    for i in range(depth):
        x = t.checkpointed(lambda x, at=f"{path}.blocks.{i}": block(x, at), x)
    return x or t.trains(f"{path}.norm")


def vit(t: Tally, path: str, cfg: ViTConfig) -> bool:
    """``VisionTransformer``: images (no gradient) -> patch tokens."""
    n, d = cfg.num_patches, cfg.width
    x = t.linear(f"{path}.patch_embed", False, n, 3 * cfg.patch_size_px**2, d, bias=True)
    x = x or t.trains(f"{path}.pos_embed")
    return encoder(t, f"{path}.encoder", x, n, d, cfg.depth, cfg.mlp_dim)


def map_head(t: Tally, path: str, cfg: ViTConfig, tokens: bool) -> bool:
    """``MAPHead``: one learned probe attends over the patch tokens, then an MLP."""
    n, d = cfg.num_patches, cfg.width
    probe = t.trains(f"{path}.probe")
    x = attention(t, f"{path}.attn", probe, tokens, 1, n, d, d, bias=True)
    h = x or t.trains(f"{path}.norm")
    h = t.linear(f"{path}.mlp.fc1", h, 1, d, cfg.mlp_dim, bias=True)
    return t.linear(f"{path}.mlp.fc2", h, 1, cfg.mlp_dim, d, bias=True) or x


def text_tower(t: Tally, path: str, cfg: TextConfig, tokens: int, embed_dim: int) -> bool:
    """``TextTransformer``: token ids -> the embedding read at the last position."""
    x = t.trains(f"{path}.token_embed") or t.trains(f"{path}.pos_embed")
    x = encoder(t, f"{path}.encoder", x, tokens, cfg.width, cfg.depth, cfg.mlp_dim)
    return t.linear(f"{path}.head", x, 1, cfg.width, embed_dim, bias=True)


# --------------------------------------------------------------------------------------- UL2


def feed_forward(t: Tally, path: str, h: bool, tokens: int, cfg: UL2Config) -> bool:
    """``FeedForward``: gate and up from one product (``wi``), then ``wo``."""
    gate_up = t.linear(f"{path}.wi", h, tokens, cfg.d_model, 2 * cfg.d_ff, bias=False)
    return t.linear(f"{path}.wo", gate_up, tokens, cfg.d_ff, cfg.d_model, bias=False)


def ul2(t: Tally, path: str, cfg: UL2Config, prefix: bool, prefix_len: int, prompt_len: int,
        target_len: int) -> bool:  # fmt: skip
    """``UL2`` as PaLI-3 runs it: the encoder over ``prefix_len`` embeddings from outside
    (``prefix``: whether they carry a gradient) and the embedded prompt, the decoder over the
    target, the LM head."""
    d, inner, seq = cfg.d_model, cfg.num_heads * cfg.d_kv, prefix_len + prompt_len
    embed = t.trains(f"{path}.embed")
    enc_bias, dec_bias = t.trains(f"{path}.encoder_bias"), t.trains(f"{path}.decoder_bias")

    def encoder_layer(x: bool, at: str) -> bool:
        h = x or t.trains(f"{at}.norm_attn")
        x = attention(t, f"{at}.attn", h, h, seq, seq, d, inner, False, joint=True,
                      scores=enc_bias) or x  # fmt: skip
        return feed_forward(t, f"{at}.ff", x or t.trains(f"{at}.norm_ff"), seq, cfg) or x

    x = prefix or embed
    for i in range(cfg.num_encoder_layers):
        x = t.checkpointed(lambda x, at=f"{path}.encoder_layers.{i}": encoder_layer(x, at), x)
    memory = x or t.trains(f"{path}.encoder_norm")

    layers = [f"{path}.decoder_layers.{i}" for i in range(cfg.num_decoder_layers)]
    cross = {
        at: (t.linear(f"{at}.cross_attn.kv_proj", memory, seq, d, 2 * inner, bias=False),) * 2
        for at in layers
    }  # ``start_decoding``: once, outside the checkpointed layers

    def decoder_layer(x: bool, at: str) -> bool:
        h = x or t.trains(f"{at}.norm_self")
        x = attention(t, f"{at}.self_attn", h, h, target_len, target_len, d, inner, False,
                      scores=dec_bias) or x  # fmt: skip
        h = x or t.trains(f"{at}.norm_cross")
        x = attention(t, f"{at}.cross_attn", h, memory, target_len, seq, d, inner, False,
                      kv_grads=cross[at]) or x  # fmt: skip
        return feed_forward(t, f"{at}.ff", x or t.trains(f"{at}.norm_ff"), target_len, cfg) or x

    x = embed
    for at in layers:
        x = t.checkpointed(lambda x, at=at: decoder_layer(x, at), x)
    x = x or t.trains(f"{path}.decoder_norm")
    return t.linear(f"{path}.lm_head", x, target_len, d, cfg.vocab_size, bias=False)
