"""Fused projections (``models/projections.py``): q/k/v, k/v and gate/up as one GEMM each give the
separate projections' outputs and gradients (1e-6, fp32) and match dense formulas written from the
separate weights; a column-parallel chunk of a fused weight holds whole heads (hidden units) of
every part at any TP size; the initialisations keep each part's scale; the switch reaches the
model through ``pali3_train.kernels`` and is refused where it cannot run."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pali3_train.config import ParallelConfig
from pali3_train.config.schema import KernelsConfig
from pali3_train.kernels import PLAIN, apply_kernels, resolve_kernels
from pali3_train.models import UL2, MAPHead, SigLIP
from pali3_train.models.attention import MultiHeadAttention, padding_bias
from pali3_train.models.projections import FusedLinear, fuse, split
from pali3_train.models.ul2 import FeedForward, shift_right
from tests.hf_reference import VIT, model_config, ul2_config

HEADS, HEAD_DIM, DIM = 4, 6, 20


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _separate(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` on the plain path (one GEMM per projection), same weights."""
    return apply_kernels(copy.deepcopy(module), PLAIN)


def _outputs_and_grads(module: torch.nn.Module, run) -> tuple[torch.Tensor, dict]:
    out = run(module)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), grads


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str = "", tol: float = 1e-6) -> None:
    """Within ``tol`` of the reference's largest magnitude: fp32 sums in another order (a bias's
    gradient over one fused output against three) differ by a few ulps of their terms."""
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


def _assert_fused_equals_separate(module: torch.nn.Module, run, tol: float = 1e-6) -> None:
    fused_out, fused_grads = _outputs_and_grads(module, run)
    plain_out, plain_grads = _outputs_and_grads(_separate(module), run)
    _assert_close(fused_out, plain_out, "output", tol)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        if grad is None:  # a parameter the output does not use (SigLIP's logit scale)
            assert fused_grads[name] is None and "proj" not in name and ".wi." not in name, name
        else:
            _assert_close(fused_grads[name], grad, name, tol)


def _dense_attention(q, k, v, bias, scale):
    """[B, L, H*hd] projections -> [B, Lq, H*hd], written out head by head."""
    heads = []
    for h in range(HEADS):
        cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) * scale + bias[:, 0]
        heads.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    return torch.cat(heads, dim=-1)


def _parts(linear: FusedLinear, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of each separate projection, cut out of the fused rows by hand:
    [head, part, head_dim]."""
    out = []
    for part in range(parts):
        rows = torch.cat(
            [
                torch.arange(HEAD_DIM) + (h * parts + part) * HEAD_DIM
                for h in range(linear.out_features // (parts * HEAD_DIM))
            ]
        )
        out.append((linear.weight[rows], linear.bias[rows]))
    return out


# ------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("width", [HEAD_DIM, 1])  # attention heads; feed-forward hidden units
@pytest.mark.parametrize("parts", [3, 2])
def test_a_column_parallel_chunk_holds_whole_groups_of_every_part(tp, width, parts):
    """megatron-core's column-parallel layer keeps a contiguous chunk of rows per rank: that
    chunk of the fused weight is the fused weight of each part's own chunk (rank r gets heads
    r*H/tp .. of q, k and v alike), whatever the TP size."""
    separate = [torch.randn(HEADS * width, DIM) for _ in range(parts)]
    fused = fuse(separate, width)
    assert fused.shape == (parts * HEADS * width, DIM)
    for rank in range(tp):
        chunk = fused.chunk(tp)[rank]
        torch.testing.assert_close(chunk, fuse([p.chunk(tp)[rank] for p in separate], width))
    for got, want in zip(split(fused, parts, width), separate):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------- fused vs separate


def test_self_attention_fused_equals_separate_and_the_dense_formula():
    torch.manual_seed(0)
    attn = _randomise(MultiHeadAttention(DIM, HEADS, HEAD_DIM, bias=True))
    x = torch.randn(3, 7, DIM)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    bias = padding_bias(mask, x.dtype)
    _assert_fused_equals_separate(attn, lambda m: m(x, bias=bias))

    (wq, bq), (wk, bk), (wv, bv) = _parts(attn.qkv_proj, 3)
    with torch.no_grad():
        mixed = _dense_attention(
            F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv), bias, HEAD_DIM**-0.5
        )
        _assert_close(attn(x, bias=bias), attn.out_proj(mixed))


def test_cross_attention_fused_equals_separate_and_the_dense_formula():
    """Keys and values of another input as one GEMM (the MAP head, UL2's cross-attention)."""
    torch.manual_seed(1)
    attn = _randomise(MultiHeadAttention(DIM, HEADS, HEAD_DIM, bias=True, joint_qkv=False))
    x, memory = torch.randn(3, 2, DIM), torch.randn(3, 9, DIM)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 4:] = False
    bias = padding_bias(mask, x.dtype)
    _assert_fused_equals_separate(attn, lambda m: m(x, kv=m.project_kv(memory), bias=bias))

    (wk, bk), (wv, bv) = _parts(attn.kv_proj, 2)
    with torch.no_grad():
        q = attn.q_proj(x)
        mixed = _dense_attention(q, F.linear(memory, wk, bk), F.linear(memory, wv, bv), bias,
                                 HEAD_DIM**-0.5)  # fmt: skip
        _assert_close(attn(x, attn.project_kv(memory), bias), attn.out_proj(mixed))


@pytest.mark.parametrize("kind", ["gated-gelu", "gated-silu"])
def test_feed_forward_fused_equals_separate_and_the_dense_formula(kind):
    torch.manual_seed(2)
    cfg = ul2_config(kind)
    ff = FeedForward(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    _assert_fused_equals_separate(ff, lambda m: m(x))

    gate, up = ff.wi.weight[0::2], ff.wi.weight[1::2]  # rows [hidden unit, {gate, up}]
    act = {"gated-gelu": lambda h: F.gelu(h, approximate="tanh"), "gated-silu": F.silu}[kind]
    with torch.no_grad():
        expected = (act(x @ gate.T) * (x @ up.T)) @ ff.wo.weight.T
        _assert_close(ff(x), expected)


def test_ul2_fused_equals_separate_end_to_end():
    """Encoder self-attention (q/k/v fused), decoder self- and cross-attention (k/v fused) and
    every feed-forward (gate/up fused), through the switch. 1e-5 (the TP parity tests'): the
    rounding of a few reordered sums grows through the layers."""
    torch.manual_seed(3)
    cfg = ul2_config("gated-silu")
    model = UL2(cfg)
    tokens = torch.randint(2, cfg.vocab_size, (2, 7))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 5:] = False
    decoder = shift_right(torch.randint(2, cfg.vocab_size, (2, 4)), cfg.pad_id)
    _assert_fused_equals_separate(model, lambda m: m(tokens, mask, decoder), tol=1e-5)


def test_siglip_and_its_map_head_fused_equal_separate():
    torch.manual_seed(4)
    model = _randomise(SigLIP(model_config(ul2_config("gated-gelu"))))
    images = torch.randn(2, 3, VIT.image_size_px, VIT.image_size_px)
    tokens = torch.randint(0, 64, (2, 12))
    _assert_fused_equals_separate(model, lambda m: torch.cat(m(images, tokens), dim=-1))


# ------------------------------------------------------------------------------ initialisation


def test_ul2_initialises_each_fused_part_at_its_own_scale():
    """T5's scheme: queries at (d_model x d_kv)^-1/2, keys, values, gate and up at
    d_model^-1/2 (the fused weights drawn part by part)."""
    torch.manual_seed(5)
    cfg = dataclasses.replace(ul2_config("gated-silu"), d_model=256, d_ff=512)
    model = UL2(cfg)
    qkv = model.encoder_layers[0].attn.qkv_proj.weight.detach()
    q, k, v = qkv.view(cfg.num_heads, 3, cfg.d_kv, cfg.d_model).unbind(1)  # [head, part, d_kv]
    wi = model.encoder_layers[0].ff.wi.weight.detach()
    gate, up = wi[0::2], wi[1::2]  # [hidden unit, part]
    cross = model.decoder_layers[0].cross_attn
    expected = {
        "q": (q, (cfg.d_model * cfg.d_kv) ** -0.5),
        "decoder q": (cross.q_proj.weight.detach(), (cfg.d_model * cfg.d_kv) ** -0.5),
        "k": (k, cfg.d_model**-0.5),
        "v": (v, cfg.d_model**-0.5),
        "decoder k/v": (cross.kv_proj.weight.detach(), cfg.d_model**-0.5),
        "gate": (gate, cfg.d_model**-0.5),
        "up": (up, cfg.d_model**-0.5),
    }
    for name, (weight, std) in expected.items():
        assert weight.std().item() == pytest.approx(std, rel=0.05), name


def test_map_head_initialises_fused_projections_as_the_separate_matrices():
    """big_vision's Xavier-uniform over each [inner, width] projection, not over the fused
    [2 x inner, width] matrix (a smaller bound)."""
    torch.manual_seed(6)
    head = MAPHead(VIT)
    bound = math.sqrt(6 / (2 * VIT.width))
    for weight in (head.attn.q_proj.weight, head.attn.kv_proj.weight):
        assert bound * 0.97 < weight.abs().max().item() <= bound
    assert not head.attn.kv_proj.bias.any()


# ---------------------------------------------------------------------------------- the switch


def test_the_switch_reaches_every_fused_module_and_is_refused_where_it_cannot_run():
    cpu = torch.device("cpu")
    assert resolve_kernels(KernelsConfig(), cpu, ParallelConfig()).projections == "fused"
    for parallel in (ParallelConfig(tensor_parallel_size=2), ParallelConfig(zero_stage=3)):
        with pytest.raises(ValueError, match="tensor parallelism and ZeRO-3") as refused:
            resolve_kernels(KernelsConfig(projections="separate"), cpu, parallel)
        assert refused.value.field_path == "kernels.projections"
    model = UL2(ul2_config("gated-gelu"))
    fused = [m for m in model.modules() if isinstance(m, (MultiHeadAttention, FeedForward))]
    assert fused and all(m.projections == "fused" for m in fused)  # the model's default
    apply_kernels(model, PLAIN)
    assert all(m.projections == "separate" for m in fused)
