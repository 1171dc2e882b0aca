"""Building the model already partitioned over the data-parallel ranks (ZeRO-3), so that no rank
ever holds all of it: a 5B model built whole in fp32 is 20 GB per rank, 160 GB on a node of 8.

DeepSpeed's ``zero.Init`` partitions each module's parameters as soon as that module's
``__init__`` returns. Two things keep the result equal to the unpartitioned build's weights
(same seed, any ZeRO stage, CPU or GPU):

- construction runs on the CPU in fp32, as in the plain build (no dtype or device override), so
  the random stream is the same; each module's parameters are cast to the training precision
  just before they are partitioned (what the engine does to a plain model);
- our towers re-initialise their children after building them (``reset_parameters``: T5's and
  big_vision's schemes), when those children are partitioned already. Inside the context a
  ``torch.nn.init`` call on a partitioned parameter fills a full-size fp32 CPU tensor instead
  (the same draws as the plain build), then the parameter is gathered, overwritten from it on
  data-parallel rank 0 and partitioned again: one parameter whole at a time.

A model must therefore write its partitioned children's weights through ``torch.nn.init`` (or
``models.projections.normal_parts_``, redirected alike) and on the parameter itself (not on a view
of it); ``tests/engine/test_zero_init.py`` checks every model against its unpartitioned build.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import is_zero_param
from torch import nn

from pali3_train.config import Config
from pali3_train.engine.deepspeed_config import deepspeed_config
from pali3_train.models import projections
from pali3_train.parallel import DeepSpeedMPU, ParallelDims, dp_group

# The in-place initialisers of torch.nn.init (each takes the tensor first, fills and returns it).
INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


def partitions_at_construction(cfg: Config) -> bool:
    return cfg.parallel.zero_stage == 3 and cfg.parallel.zero.partitioned_init


def construction(cfg: Config, dims: ParallelDims) -> contextlib.AbstractContextManager:
    """The context to build the stage's model in: partitioned under ZeRO-3 (unless
    ``parallel.zero.partitioned_init`` is off), plain otherwise."""
    if not partitions_at_construction(cfg):
        return contextlib.nullcontext()
    return _partitioned(deepspeed_config(cfg, dims.dp))


@contextlib.contextmanager
def _partitioned(ds_config: dict) -> Iterator[None]:
    # DeepSpeed's wrapper round our process group, which deepspeed.initialize would create later:
    # without it zero.Init reads the config as if for one rank.
    deepspeed.init_distributed(dist_init_required=False)
    # The engine's own config and data-parallel group, so the partitions are the ones it expects.
    init = _PlainInit(data_parallel_group=dp_group(), config_dict_or_path=ds_config,
                      mpu=DeepSpeedMPU(), tensor_overrides=[])  # fmt: skip
    with init, _initialisers_redirected():
        yield


class _PlainInit(deepspeed.zero.Init):
    """``zero.Init`` that builds on the CPU in fp32 like the plain build (``tensor_overrides=[]``)
    and casts each module's parameters to the training precision as it partitions them."""

    def _post_init_method(self, module: nn.Module) -> None:
        for param in module.parameters(recurse=False):
            if not is_zero_param(param) and param.is_floating_point():
                param.data = param.data.to(self.dtype)
        super()._post_init_method(module)


# (module, name) of every initialiser redirected: torch's, and ours for a fused projection whose
# parts are drawn at different scales (it writes through a view of the weight).
_REDIRECTED = (*((nn.init, name) for name in INITIALISERS), (projections, "normal_parts_"))


@contextlib.contextmanager
def _initialisers_redirected() -> Iterator[None]:
    originals = {(owner, name): getattr(owner, name) for owner, name in _REDIRECTED}
    for (owner, name), initialiser in originals.items():
        setattr(owner, name, _on_full_copy(initialiser))
    try:
        yield
    finally:
        for (owner, name), initialiser in originals.items():
            setattr(owner, name, initialiser)


def _on_full_copy(initialiser: Callable) -> Callable:
    @functools.wraps(initialiser)
    def initialise(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not is_zero_param(tensor):
            return initialiser(tensor, *args, **kwargs)
        full = torch.empty(tensor.ds_shape, dtype=torch.get_default_dtype())
        initialiser(full, *args, **kwargs)  # every rank draws, so the random streams stay equal
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0), torch.no_grad():
            tensor.data.copy_(full)
        return tensor

    return initialise
