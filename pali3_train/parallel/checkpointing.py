"""Activation checkpointing applied from outside the models: recompute each transformer block in
the backward pass instead of keeping its activations.

Memory for activations grows with depth x sequence length (PaLI-3 at 812 px feeds the encoder
over a thousand visual tokens); keeping only each block's input costs one extra forward. Blocks
are wrapped in place (their ``forward`` is replaced on the instance), so parameter names and
state-dict keys stay those of the plain model. Non-reentrant ``torch.utils.checkpoint`` is used:
it handles blocks whose parameters are all frozen and whose input needs no gradient (a frozen ViT),
and keyword arguments. Works under tensor parallelism: every rank recomputes the same blocks in the
same order, so the recomputed all-reduces match.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pali3_train.models.transformer import EncoderBlock
from pali3_train.models.ul2 import DecoderLayer, EncoderLayer

Call = inspect.BoundArguments


def _always(call: Call) -> bool:
    return True


def _no_cache(call: Call) -> bool:
    # A step that extends a key/value cache is generation: no backward pass to save memory for.
    return call.arguments["past_kv"] is None


# Block type -> when a call is checkpointed (given its bound arguments). Only while autograd
# records: under no_grad (evaluation, generation) blocks run plainly.
AC_PLAN: dict[type[nn.Module], Callable[[Call], bool]] = {
    EncoderBlock: _always,  # SigLIP ViT and text tower
    EncoderLayer: _always,  # UL2 encoder
    DecoderLayer: _no_cache,  # UL2 decoder
}


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every block of ``model`` listed in ``AC_PLAN``, in place; returns ``model``.
    Applying it twice changes nothing."""
    for module in model.modules():
        if type(module) in AC_PLAN and "forward" not in vars(module):
            # Bound to the instance (not a closure over it), so copy.deepcopy rebinds it.
            # ``inner_forward`` is what is recomputed: the block's own forward, which
            # parallel/compile.py may replace with its compiled form.
            module.inner_forward = types.MethodType(type(module).forward, module)
            module.forward = types.MethodType(_checkpointed_forward, module)
    return model


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = self.inner_forward
    when = AC_PLAN[type(self)]
    call = inspect.signature(type(self).forward).bind(self, *args, **kwargs)
    if torch.is_grad_enabled() and when(call):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
