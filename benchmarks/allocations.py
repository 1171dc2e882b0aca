"""The peak of what one call allocates, on the CPU or on CUDA: what the benchmarks' memory columns
are measured with.

CUDA keeps its own peak counter. The CPU allocator has none, but under ``torch.profiler`` with
``profile_memory=True`` it reports every allocation and free with its size (worker threads such as
gloo's included); the peak is the maximum of the running sum of those sizes in time order. Either
way only what the call allocates counts (activations, autograd's saved tensors, gradients,
temporaries), not what existed before it: process RSS would bury that under torch's and the
allocator's caches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes ``fn()`` held at once beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    _allocations(prof.profiler.kineto_results.experimental_event_tree(), events)
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def _allocations(nodes, out: list[tuple[int, int]]) -> None:
    """(time ns, bytes: + allocated, - freed) of every allocation event under ``nodes``."""
    for node in nodes:
        if node.tag == _EventType.Allocation:
            out.append((node.start_time_ns, node.extra_fields.alloc_size))
        _allocations(node.children, out)
