"""Regional ``torch.compile`` applied from outside the models: each transformer block's forward
is compiled on its own (torchtitan's habit), after tensor parallelism and activation
checkpointing and before DeepSpeed wraps the model.

Regions, not the whole model: the blocks are where the time goes and they repeat, so one graph
per block type serves every layer (dynamo caches by code object, and torch >= 2.5 treats a
module's parameters as graph inputs, not constants: N identical blocks compile once). The glue
between blocks (embeddings, masks, the loss) stays eager.

What is compiled is the block's own forward, inside activation checkpointing's recomputed region
(``parallel/checkpointing.py`` calls the block's ``inner_forward``): the checkpoint runs eagerly
around a compiled graph and recomputes by running that graph again. Compiling around the
checkpoint fails with torch 2.13: a graph break inside it (every ZeRO-3 layer has one) makes
dynamo run the whole checkpoint eagerly, and it rebuilds the block's forward as ``self.forward``
there (an endless recursion once that is replaced); in a frozen tower inductor refuses the
checkpoint's RNG bookkeeping.

Under ZeRO-3 each submodule's parameter fetch/release hook is a ``torch.compiler.disable``d graph
break by DeepSpeed's design, so a block compiles into the pieces between its layers' calls
(norms, activations, residuals, attention): correct, and what DeepSpeed's own
``engine.compile()`` does without DeepCompile. Megatron-core's tensor-parallel linears run
eagerly inside the compiled block, the same kind of break: traced, their asynchronous
all-reduces and process-group attributes break the graph several times per layer, their one
shared forward runs into dynamo's recompile limit, and the ranks can end up with different
graphs around a collective.

Only while autograd records: evaluation and generation (``no_grad``) run the blocks eagerly, so
a decoder extending its key/value cache never recompiles for each new length, and no inference
graph is compiled for a forward pass that runs once per evaluation.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from megatron.core import tensor_parallel
from torch import nn

from pali3_train.parallel.checkpointing import AC_PLAN

# The transformer blocks: the same regions activation checkpointing recomputes.
BLOCKS: tuple[type[nn.Module], ...] = tuple(AC_PLAN)

# Where a checkpointed block keeps its own forward (the recomputed region).
INNER = "inner_forward"

# Layers inside a block that run eagerly (see above).
EAGER_LAYERS = (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)


def compile_blocks(model: nn.Module) -> nn.Module:
    """Compile the forward of every block of ``model`` listed in ``BLOCKS``, in place (state-dict
    keys unchanged); returns ``model``. Applying it twice changes nothing. Call it after tensor
    parallelism and activation checkpointing: checkpointing applied later would skip a block
    whose forward is replaced already."""
    for module in model.modules():
        if type(module) in BLOCKS:
            _replace_forward(module, INNER if INNER in vars(module) else "forward", _compiled)
            for layer in module.modules():
                if isinstance(layer, EAGER_LAYERS):
                    _replace_forward(layer, "forward", _eager_forward)
    return model


def _replace_forward(module: nn.Module, slot: str, forward: Callable) -> None:
    if getattr(vars(module).get(slot), "__func__", None) is not forward:
        # Bound to the instance (not a closure over it), so copy.deepcopy rebinds it.
        setattr(module, slot, types.MethodType(forward, module))


def _compiled(self: nn.Module, *args, **kwargs):
    forward = type(self).forward  # the block's own forward
    if torch.is_grad_enabled():
        forward = _compiled_function(forward)
    return forward(self, *args, **kwargs)


@functools.cache
def _compiled_function(forward: Callable) -> Callable:
    # One wrapper per block type; shapes are fixed in training (dynamic=False: no symbolic
    # shapes, no recompile to a dynamic graph).
    return torch.compile(forward, dynamic=False)


@torch.compiler.disable
def _eager_forward(self: nn.Module, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)
