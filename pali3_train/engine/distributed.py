"""Process-group start-up from whatever launched us: ``deepspeed``, ``torchrun``, ``srun`` or a
plain ``python`` (one process).

The launcher is the only code that reads RANK/WORLD_SIZE and friends; everything below it gets
a ``DistEnv`` and process groups.

Timeouts. Every collective fails after ``parallel.collective_timeout_s`` (on GPUs NCCL's watchdog
aborts the job), so no rank may sit in a collective while rank 0 alone does long work (a
checkpoint's conversion, the final export): ``on_main_rank`` runs such work while the other
ranks wait on a separate CPU group whose timeout is hours, not the collective timeout.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from pali3_train.quiet import library_chatter

T = TypeVar("T")
# How long ranks wait for work that rank 0 does alone (a 5B checkpoint's conversion to the
# universal format reads and writes every tensor once: minutes, on a slow file system an hour).
MAIN_RANK_WORK_TIMEOUT = timedelta(hours=6)
_main_rank_wait: dist.ProcessGroup | None = None  # gloo, created with the default group


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


def init_distributed(env: DistEnv, timeout_s: float = 1800.0) -> torch.device:
    """Start the default process group (NCCL on GPUs, bound to this rank's device at once;
    gloo on CPU) with collectives timing out after ``timeout_s``, and the CPU group that
    ``on_main_rank`` waits on. Returns this rank's device."""
    global _main_rank_wait
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend, bound = "nccl", {"device_id": device}
    else:
        device, backend, bound = torch.device("cpu"), "gloo", {}
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
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), **bound)  # fmt: skip
    _main_rank_wait = dist.new_group(backend="gloo", timeout=MAIN_RANK_WORK_TIMEOUT)
    _wrap_for_deepspeed()
    return device


def _wrap_for_deepspeed() -> None:
    """DeepSpeed's communication wrapper round the group just made, which every engine and
    ``zero.Init`` use: made here once, quietly (on CPU it announces the op it builds)."""
    import deepspeed  # heavy: imported by the ranks that train, not by every user of this module

    with library_chatter():
        deepspeed.init_distributed(dist_init_required=False)


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


class MainRankFailed(RuntimeError):
    """Raised on the other ranks when ``on_main_rank``'s work failed on rank 0 (which raised
    the original error, and reports it)."""


def on_main_rank(work: Callable[[], T], what: str) -> T | None:
    """Collective. Rank 0 runs ``work`` (its result is returned there, None elsewhere) while the
    others wait on a gloo group with ``MAIN_RANK_WORK_TIMEOUT``: no NCCL collective is pending,
    so however long the work takes, no watchdog fires. If it fails on rank 0, rank 0 raises its
    error and the others ``MainRankFailed`` with its message."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    group = _wait_group()
    failure, result = [None], None
    if dist.get_rank() == 0:
        try:
            result = work()
        except BaseException as exc:
            dist.broadcast_object_list([f"{type(exc).__name__}: {exc}"], src=0, group=group)
            raise
    dist.broadcast_object_list(failure, src=0, group=group)
    if failure[0] is not None:
        raise MainRankFailed(f"rank 0 failed to {what}: {failure[0]}")
    return result


def gather_objects(value: T) -> list[T]:
    """Collective: every rank's ``value`` (small, picklable data of our own, such as file digests
    or error messages), in rank order, on every rank; over the gloo group, so on GPUs too
    nothing touches the device. One process: ``[value]``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_wait_group())
    return values


def _wait_group() -> dist.ProcessGroup:
    """The gloo group ``on_main_rank`` waits on; made here (a collective, as every caller is)
    for a default group started without ``init_distributed``."""
    global _main_rank_wait
    if _main_rank_wait is None:
        _main_rank_wait = dist.new_group(backend="gloo", timeout=MAIN_RANK_WORK_TIMEOUT)
    return _main_rank_wait
