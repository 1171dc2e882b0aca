"""The device guard refuses, on a CPU machine, what an NCCL/CUDA rank would refuse: tensors our
code allocates without a device inside a step, and collective inputs on another device.

The guard's own-code rule is exercised with code compiled as if it lived in the package (the
file name is what the guard looks at), so that these tests need no deliberately buggy module."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pali3_train.engine import device_guard
from pali3_train.engine.device_guard import DeviceError, DeviceGuard
from pali3_train.engine.distributed import free_port

CPU = torch.device("cpu")
PACKAGE_FILE = device_guard.OWN_CODE[0] + "fake_module.py"

# What the trainer's bad-loss decision once did: the device loss stacked with a CPU tensor.
OLD_BAD_LOSS_DECISION = """
def decide(loss, tokens):
    return torch.stack([loss.float(), torch.tensor(float(tokens))])
"""
FIXED = """
def decide(loss, tokens):
    return torch.stack([loss.float(), torch.tensor(float(tokens), device=loss.device)])
"""


def _as_package_code(source: str):
    namespace = {"torch": torch}
    exec(compile(source, PACKAGE_FILE, "exec"), namespace)
    return namespace["decide"]


def test_an_allocation_without_device_in_our_code_is_refused_with_its_line():
    decide = _as_package_code(OLD_BAD_LOSS_DECISION)
    with pytest.raises(DeviceError, match=r"pali3_train/fake_module.py:3: torch.tensor without"):
        with DeviceGuard(CPU):
            decide(torch.tensor(1.0), 5)


def test_the_same_code_with_its_device_named_passes_and_computes_the_same():
    with DeviceGuard(CPU):
        got = _as_package_code(FIXED)(torch.tensor(2.0), 5)
    assert torch.equal(got, torch.tensor([2.0, 5.0]))


def test_outside_the_guard_and_outside_our_code_nothing_is_checked():
    decide = _as_package_code(OLD_BAD_LOSS_DECISION)
    decide(torch.tensor(1.0), 5)  # no guard
    with DeviceGuard(CPU):
        torch.zeros(3)  # this test file is not the package's code
        torch.as_tensor(torch.ones(2))  # a tensor of a tensor keeps its device


@pytest.fixture
def gloo_world(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_collective_input_on_another_device_is_refused(gloo_world):
    stray, original = torch.zeros(2, device="meta"), dist.all_reduce
    with pytest.raises(DeviceError, match=r"all_reduce: input on meta, but the engine runs on cpu"):
        with DeviceGuard(CPU):
            dist.all_reduce(stray)
    with pytest.raises(DeviceError, match=r"isend: input on meta"):
        with DeviceGuard(CPU):
            dist.batch_isend_irecv([dist.P2POp(dist.isend, stray, 0)])
    value = torch.ones(2)
    with DeviceGuard(CPU):
        dist.all_reduce(value)  # on the engine's device: fine
    assert dist.all_reduce is original  # unwrapped again


def test_the_guard_is_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv(device_guard.ENV_VAR, raising=False)
    assert not isinstance(device_guard.device_guard(CPU), DeviceGuard)
    monkeypatch.setenv(device_guard.ENV_VAR, "1")
    assert isinstance(device_guard.device_guard(CPU), DeviceGuard)


def test_a_gloo_group_takes_cpu_tensors_whatever_the_engine_device(gloo_world):
    """The wait for rank-0 work is a gloo group beside the engine's (NCCL on GPUs) groups."""
    cpu_group = dist.new_group(backend="gloo")
    with DeviceGuard(torch.device("meta")):  # an engine elsewhere than the CPU
        dist.broadcast(torch.zeros(1), src=0, group=cpu_group)
        with pytest.raises(DeviceError, match="engine runs on meta"):
            dist.broadcast(torch.zeros(1), src=0)


def test_nested_guards_restore_torch_distributed(gloo_world):
    original = dist.all_reduce
    guard = DeviceGuard(CPU)
    with guard, guard:
        pass
    assert dist.all_reduce is original
