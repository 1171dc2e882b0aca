"""The separate q/k/v and gate/up layout (HuggingFace's, and our files' before the fusion) <->
our fused projections (``convert/fusion.py``), checked against rows cut out by hand."""

import pytest
import torch

from pali3_train.convert.fusion import fuse_projections, split_projections

HEADS, HEAD_DIM, DIM, HIDDEN = 3, 4, 5, 6


def _separate() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(7, DIM, generator=g)}
    for module in ("enc.attn", "dec.cross_attn"):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{module}.{proj}.weight"] = torch.randn(HEADS * HEAD_DIM, DIM, generator=g)
            state[f"{module}.{proj}.bias"] = torch.randn(HEADS * HEAD_DIM, generator=g)
    for proj in ("wi_gate", "wi_up"):
        state[f"enc.ff.{proj}.weight"] = torch.randn(HIDDEN, DIM, generator=g)
    return state


def _fused(state):
    return fuse_projections(state, lambda _: HEAD_DIM, joint=lambda m: m == "enc.attn")


def test_fusing_orders_rows_by_head_then_part_and_splitting_undoes_it():
    separate = _separate()
    fused = _fused(separate)
    assert sorted(fused) == sorted(
        [
            "embed.weight",
            *[f"enc.attn.{p}.{k}" for p in ("qkv_proj", "out_proj") for k in ("weight", "bias")],
            *[
                f"dec.cross_attn.{p}.{k}"
                for p in ("q_proj", "kv_proj", "out_proj")
                for k in ("weight", "bias")
            ],  # fmt: skip
            "enc.ff.wi.weight",
        ]
    )
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            block = slice((3 * h + i) * HEAD_DIM, (3 * h + i + 1) * HEAD_DIM)
            for kind in ("weight", "bias"):
                want = separate[f"enc.attn.{part}.{kind}"][rows]
                assert torch.equal(fused[f"enc.attn.qkv_proj.{kind}"][block], want)
        for i, part in enumerate(("k_proj", "v_proj")):
            block = slice((2 * h + i) * HEAD_DIM, (2 * h + i + 1) * HEAD_DIM)
            want = separate[f"dec.cross_attn.{part}.weight"][rows]
            assert torch.equal(fused["dec.cross_attn.kv_proj.weight"][block], want)
    assert torch.equal(fused["enc.ff.wi.weight"][0::2], separate["enc.ff.wi_gate.weight"])
    assert torch.equal(fused["enc.ff.wi.weight"][1::2], separate["enc.ff.wi_up.weight"])

    back = split_projections(fused, lambda _: HEAD_DIM)
    assert back.keys() == separate.keys()
    for name, value in separate.items():
        assert torch.equal(back[name], value), name


def test_a_group_missing_a_part_is_an_error_naming_it():
    state = _separate()
    del state["enc.attn.v_proj.bias"]
    with pytest.raises(KeyError, match=r"enc\.attn\.v_proj\.bias"):
        _fused(state)
