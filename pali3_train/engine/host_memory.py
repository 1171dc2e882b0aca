"""Host memory that ZeRO-3 frees going back to the system, when its partitions live there.

On a CPU host (gloo runs) ZeRO-3 keeps its partitions in host memory and, beside them, makes and
frees whole tensors all the time: each parameter built whole then partitioned, each gathered for
its module's forward and backward. glibc raises its mmap threshold to the size of the first large
block freed (up to 32 MiB), and from then on serves such blocks from its heap, where the
long-lived partitions between them keep the freed space from being returned. Measured on 2 CPU
ranks: the 1B preset's partitioned start-up peaked at 4451 MiB per rank, above the unpartitioned
one's 4321, and at 2734 with the threshold fixed (``benchmarks/README.md``); the small preset's
ZeRO-3 training kept 726 MiB of free heap per rank. A fixed threshold maps every block of
``threshold`` bytes or more on its own, so freeing one unmaps it. On GPUs the partitions live in
device memory and none of this applies.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def map_large_allocations(threshold: int = 2**20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, for the rest
    of the process (glibc only; elsewhere nothing changes). True if glibc took it."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
