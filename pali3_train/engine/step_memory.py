"""The peak memory of one training step, as the trainer logs it (``memory_gib``).

The peak is reset at each step's start and read at its end, so a step reports its own peak: a
run's peak so far would be start-up's (building, loading, the first evaluation) and hide how the
steps themselves grow. On CUDA it is the caching allocator's peak of allocated bytes
(``memory_gib``) and of the bytes it reserved from the driver (``memory_reserved_gib``: what
fragmentation costs, the CUDA context aside). On CPU it is the process's peak resident set: Linux
resets it (VmHWM) when "5" is written to ``/proc/self/clear_refs``; where that is impossible,
getrusage's peak, which is the process's lifetime peak.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

GiB = 2**30
CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the lifetime peak is read instead


def _peak_rss_bytes() -> float:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """The peak since ``reset_peak_memory``, in GiB, by metric name."""
    if device.type == "cuda":
        return {
            "memory_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "memory_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
        }
    return {"memory_gib": _peak_rss_bytes() / GiB}
