"""Process-group start-up from whatever launched us: ``deepspeed``, ``torchrun``, ``srun`` or a
plain ``python`` (one process).

The launcher is the only code that reads RANK/WORLD_SIZE and friends; everything below it gets
a ``DistEnv`` and process groups.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """torchrun and deepspeed set RANK/WORLD_SIZE/LOCAL_RANK; under Slurm's srun only
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID exist (the batch script exports MASTER_ADDR/PORT)."""
    env = os.environ
    if "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env:
        return DistEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return DistEnv(0, 1, 0)


def init_distributed(env: DistEnv) -> torch.device:
    """Start the default process group (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # DeepSpeed reads these itself; srun and plain python do not set them.
    for name, value in (
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
    ):
        os.environ.setdefault(name, str(value))
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any: every rank must take the same path (a
    skipped step, a save, a stop), or collectives deadlock."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
