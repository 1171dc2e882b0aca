"""Normalisation and gated activations: NVIDIA apex's fused CUDA kernels when apex is installed,
PyTorch's own fused ops otherwise.

Model code calls only these functions, so the choice of kernel is made in one place. apex's kernels
are CUDA-only; on CPU tensors (tests, the demo) the PyTorch path runs even when apex imports.
apex ships no gated-GELU/SiLU kernel, so the gated activation always uses PyTorch's ops, which
``torch.compile`` fuses on GPU.
"""

from __future__ import annotations

import types
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pali3_train.precision import upcast

GatedActivation = Literal["gated-gelu", "gated-silu"]


def _load_apex() -> types.SimpleNamespace | None:
    """apex's functional fused norms, or None. (PyPI's unrelated `apex` has no `apex.normalization`
    and is treated as absent.)"""
    try:
        from apex.normalization.fused_layer_norm import (
            fused_layer_norm_affine,
            fused_rms_norm_affine,
        )
    except (ImportError, OSError):
        return None
    return types.SimpleNamespace(layer_norm=fused_layer_norm_affine, rms_norm=fused_rms_norm_affine)


_APEX = _load_apex()


def norm_backend(x: torch.Tensor) -> str:
    """Which implementation normalises ``x``: "apex" or "torch"."""
    return "apex" if _APEX is not None and x.is_cuda else "torch"


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Statistics and affine in fp32, the result in ``x``'s dtype (``pali3_train.precision``;
    apex's kernels accumulate in fp32 themselves)."""
    if norm_backend(x) == "apex":
        return _APEX.layer_norm(x, weight, bias, weight.shape, eps)
    out = F.layer_norm(upcast(x), weight.shape, upcast(weight), upcast(bias), eps)
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's scale-only norm (no mean subtraction, no bias), in fp32 like ``layer_norm``."""
    if norm_backend(x) == "apex":
        return _APEX.rms_norm(x, weight, weight.shape, eps)
    return F.rms_norm(upcast(x), weight.shape, upcast(weight), eps).to(x.dtype)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: GatedActivation) -> torch.Tensor:
    """act(gate) * up, with T5 v1.1's tanh-approximated GELU or UL2's SiLU."""
    if kind == "gated-gelu":
        return F.gelu(gate, approximate="tanh") * up
    if kind == "gated-silu":
        return F.silu(gate) * up
    raise ValueError(f"unknown gated activation {kind!r}")


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
