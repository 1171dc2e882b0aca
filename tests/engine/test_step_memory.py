"""A step's peak memory (``engine.step_memory``) on CPU: reset at the step's start, a freed
allocation of an earlier step no longer shows; without /proc, the lifetime peak."""

from __future__ import annotations

import resource

import pytest
import torch

from pali3_train.engine import step_memory

CPU = torch.device("cpu")
BIG = 2**26  # float32 elements: 256 MiB


def test_a_step_reports_its_own_peak_not_an_earlier_steps():
    step_memory.reset_peak_memory(CPU)
    big = torch.ones(BIG)  # written, so resident
    during = step_memory.peak_memory_gib(CPU)["memory_gib"]
    del big
    step_memory.reset_peak_memory(CPU)
    after = step_memory.peak_memory_gib(CPU)["memory_gib"]
    assert during - after > 0.9 * BIG * 4 / 2**30


def test_without_proc_the_lifetime_peak_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(step_memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    monkeypatch.setattr(step_memory, "STATUS", tmp_path / "missing" / "status")
    step_memory.reset_peak_memory(CPU)  # nothing to reset, no error
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    assert step_memory.peak_memory_gib(CPU)["memory_gib"] == pytest.approx(lifetime, abs=0.01)
