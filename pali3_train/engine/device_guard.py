"""A guard that makes GPU-only device bugs fail on a CPU machine too.

On GPUs an NCCL group serves CUDA tensors only, and torch refuses to mix CUDA and CPU tensors in
one op; a tensor our code creates without ``device=`` lands on the CPU and stops the first step.
On a CPU machine the same code passes, because every tensor is on the CPU anyway. Inside the guard
two rules hold, and breaking either raises ``DeviceError`` naming the file and line:

- a factory call (``torch.tensor``, ``zeros``, ``arange``, ...) made from this project's code
  names its device (``device=x.device``, or ``device="cpu"`` where the CPU is meant);
- every input of a ``torch.distributed`` collective or point-to-point op is on the engine's
  device.

The trainer wraps each step and evaluation in it when ``PALI3_DEVICE_GUARD=1`` (the test suite
sets it for every run it starts, so every multi-rank test checks the rules). Off by default: it
inspects the caller's frame at every tensor factory call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ENV_VAR = "PALI3_DEVICE_GUARD"

# Factories whose result lands on the default device unless told otherwise.
FACTORIES = frozenset(
    {
        torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
        torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
        torch.randint, torch.randperm, torch.scalar_tensor,
    }
)  # fmt: skip
# torch.distributed entry points whose tensor arguments are checked. isend/irecv are checked
# where they run, in batch_isend_irecv: P2POp recognises them by identity, so they stay unwrapped.
COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "gather",
    "scatter",
)  # fmt: skip
_ROOT = Path(__file__).resolve().parents[2]
OWN_CODE = tuple(
    f"{_ROOT / package}{os.sep}" for package in ("pali3_train", "data_pipeline", "launcher")
)
_TORCH = str(Path(torch.__file__).parent) + os.sep


class DeviceError(RuntimeError):
    """A tensor that would be on the wrong device on a GPU."""


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The guard for a rank whose engine runs on ``device`` when ``PALI3_DEVICE_GUARD`` is set,
    otherwise a context that does nothing."""
    return DeviceGuard(device) if enabled() else contextlib.nullcontext()


class DeviceGuard(TorchFunctionMode):
    """Re-enterable (the trainer enters it once per micro-batch) and nestable."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self._patches: list[contextlib.AbstractContextManager] = []

    def __enter__(self):
        patch = _checked_collectives(self.device)
        patch.__enter__()
        self._patches.append(patch)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.pop().__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and _implicit(func, args):
            where = _caller()
            if where is not None:
                raise DeviceError(
                    f"{where}: torch.{func.__name__} without device= inside a training step "
                    f"(it would land on the CPU beside tensors on {self.device}); pass "
                    "device=... explicitly"
                )
        return func(*args, **kwargs)


def _implicit(func: Callable, args: tuple) -> bool:
    """``torch.tensor(t)`` / ``as_tensor(t)`` of a tensor keep its device; everything else
    without ``device=`` takes the default one."""
    return not (func in (torch.tensor, torch.as_tensor) and args and torch.is_tensor(args[0]))


def _caller() -> str | None:
    """'file:line' of the first frame outside torch, if it is this project's code."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH)
                                 or frame.f_code.co_filename == __file__):  # fmt: skip
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(OWN_CODE):
        return None
    return f"{os.path.relpath(frame.f_code.co_filename, _ROOT)}:{frame.f_lineno}"


@contextlib.contextmanager
def _checked_collectives(device: torch.device) -> Iterator[None]:
    """Wrap torch.distributed's collectives (looked up at call time by us, DeepSpeed and
    megatron-core alike) to check their inputs' device; ``batch_isend_irecv`` checks each op."""
    saved = {name: getattr(dist, name) for name in (*COLLECTIVES, "batch_isend_irecv")}
    try:
        for name in COLLECTIVES:
            setattr(dist, name, _checked(saved[name], name, device))
        dist.batch_isend_irecv = _checked_p2p(saved["batch_isend_irecv"], device)
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def _checked(collective: Callable, name: str, device: torch.device) -> Callable:
    @functools.wraps(collective)
    def run(*args, **kwargs):
        expected = _group_device(kwargs.get("group"), device)
        for value in (*args, *kwargs.values()):
            _check_tensors(value, f"torch.distributed.{name}", expected)
        return collective(*args, **kwargs)

    return run


def _group_device(group, device: torch.device) -> torch.device:
    """A gloo group serves CPU tensors, whatever the engine's device (the wait for rank-0 work
    is one, ``engine.distributed.on_main_rank``); other groups, the engine's device."""
    if group is not None and dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return device


def _checked_p2p(batch: Callable, device: torch.device) -> Callable:
    @functools.wraps(batch)
    def run(ops, *args, **kwargs):
        for op in ops:
            _check_tensors(op.tensor, f"torch.distributed.{op.op.__name__}", device)
        return batch(ops, *args, **kwargs)

    return run


def _check_tensors(value, what: str, device: torch.device) -> None:
    tensors = value if isinstance(value, (list, tuple)) else [value]
    for tensor in tensors:
        if torch.is_tensor(tensor) and not _same_device(tensor.device, device):
            raise DeviceError(
                f"{what}: input on {tensor.device}, but the engine runs on {device} (an NCCL "
                "group serves only CUDA tensors)"
            )


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device for a rank that set cuda:0 as its own."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
