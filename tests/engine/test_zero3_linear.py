"""ZeRO-3's memory-efficient linears (``engine/zero3_linear.py``): the same outputs and gradients
as ``nn.Linear``, but what autograd keeps for the backward pass is the weight parameter itself,
never a view of its storage (a view would pin a gathered ZeRO-3 weight until the backward)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pali3_train.engine.zero3_linear import use_memory_efficient_linears


def _run(model: nn.Sequential, x: torch.Tensor) -> dict:
    """Forward and backward; what autograd saved that shares the first weight's storage."""
    weight = model[0].weight
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            kept.append("weight" if tensor is weight else "view")
        return tensor

    inputs = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(inputs)
    out.square().sum().backward()
    grads = [inputs.grad, *(p.grad for p in model.parameters())]
    return {"out": out.detach(), "grads": grads, "kept": kept}


def test_memory_efficient_linears_compute_the_same_and_keep_no_view_of_the_weight():
    plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4, bias=False))
    efficient = use_memory_efficient_linears(copy.deepcopy(plain))
    x = torch.randn(2, 5, 8)  # [B, L, D], as in the towers
    reference, got = _run(plain, x), _run(efficient, x)
    torch.testing.assert_close(got["out"], reference["out"])
    for a, b in zip(got["grads"], reference["grads"], strict=True):
        torch.testing.assert_close(a, b)
    assert "view" in reference["kept"]  # nn.Linear keeps the transposed weight
    assert got["kept"] == ["weight"]  # the parameter itself, once
