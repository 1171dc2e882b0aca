"""Helpers for the parallel tests: real ranks (forked processes over gloo with megatron-core's
groups), reassembly of tensor-parallel shards for comparison with an unsharded model, and the tiny
model and batch every test uses.

Fork (not spawn): children inherit the already imported torch/megatron-core, which take seconds
to import. Results travel back through files written by rank 0.
"""

from __future__ import annotations

import faulthandler
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pali3_train.config import ModelConfig, load_config
from pali3_train.models import PaLI3
from pali3_train.parallel import ParallelDims, destroy_model_parallel, init_model_parallel
from pali3_train.parallel.dims import tp_group

RANK_TIMEOUT_S = 60


def tiny_config() -> ModelConfig:
    return load_config("configs/models/tiny.yaml").model


def run_on_ranks(fn: Callable[..., None], world: int, tp: int, *args) -> None:
    """Run ``fn(dims, *args)`` on ``world`` ranks with TP groups of ``tp``; raises if a rank
    fails."""
    mp.start_processes(
        _rank_main, (world, tp, free_port(), fn, args), nprocs=world, start_method="fork"
    )


def _rank_main(rank: int, world: int, tp: int, port: int, fn: Callable, args: tuple) -> None:
    # A rank stuck in a collective would hold the suite until pytest's 15-minute timeout: dump its
    # stack and exit instead, which fails the test.
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dims = ParallelDims(world_size=world, tp=tp)
    try:
        init_model_parallel(dims)
        fn(dims, *args)
        faulthandler.cancel_dump_traceback_later()
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather_tp(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's copy of ``tensor``, in TP rank order."""
    parts = [torch.empty_like(tensor) for _ in range(tp_group().size())]
    dist.all_gather(parts, tensor.detach().contiguous(), group=tp_group())
    return parts


def assemble(model: nn.Module, of: Callable[[nn.Parameter], torch.Tensor | None]) -> dict:
    """name -> the unsharded tensor ``of(param)`` (its data or grad): TP-sharded parameters are
    concatenated along the dimension they are tagged with; replicated ones come back as a stack
    of every TP rank's copy [tp, ...], each of which must equal the unsharded tensor."""
    out = {}
    for name, param in model.named_parameters():
        tensor = of(param)
        if tensor is None:
            out[name] = None
        elif getattr(param, "tensor_model_parallel", False):
            out[name] = torch.cat(gather_tp(tensor), dim=param.partition_dim)
        else:
            out[name] = torch.stack(gather_tp(tensor))
    return out


def randomise_vectors(model: nn.Module) -> None:
    """Biases start at zero and norms at one: perturb every 1-D parameter so that a misplaced
    bias or norm slice would show."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)


def pali3_batch(cfg, seed: int = 1, batch: int = 2):
    """Images, a padded prompt and a padded target whose ids fall in both vocabulary halves."""
    g = torch.Generator().manual_seed(seed)
    vocab, pad, eos = cfg.ul2.vocab_size, cfg.ul2.pad_id, cfg.ul2.eos_id
    size = cfg.vit.image_size_px
    images = torch.randn(batch, 3, size, size, generator=g)
    prompt = torch.randint(2, vocab, (batch, 5), generator=g)
    prompt[1, 3:] = pad
    target = torch.randint(2, vocab, (batch, 6), generator=g)
    target[0, 0], target[1, 0] = 3, vocab - 3
    target[:, -1] = eos
    target[1, 3], target[1, 4:] = eos, pad
    return images, prompt, prompt != pad, target, target != pad


def tiny_pali3(freeze_vit: bool = False) -> PaLI3:
    torch.manual_seed(0)  # every rank builds the same whole model
    model = PaLI3(tiny_config())
    randomise_vectors(model)
    model.vit.requires_grad_(not freeze_vit)
    return model
