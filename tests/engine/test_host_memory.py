"""glibc's heap keeps what ZeRO-3-like churn frees unless the mmap threshold is fixed
(``engine/host_memory.py``): 64 transient 4 MiB tensors with small long-lived ones between them,
freed, in a fresh process each way (the setting is process-wide)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHURN = """
import sys
from pathlib import Path
import torch
from pali3_train.engine.host_memory import map_large_allocations

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    assert map_large_allocations()
torch.ones(2**21).sum()  # one 8 MiB block freed: glibc's threshold rises past 4 MiB blocks
keep, transient = [], []
for _ in range(64):
    transient.append(torch.ones(2**20))  # 4 MiB: a weight gathered for its forward
    keep.append(torch.ones(2**14))  # 64 KiB between them: a partition, kept
before = rss()
del transient
print((before - rss()) / 2**20)
"""


def _returned_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    return float(out.stdout.strip())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_freed_tensors_go_back_to_the_system_only_with_the_threshold_fixed():
    assert _returned_mib("default") < 32  # glibc's dynamic threshold: the 256 MiB stay resident
    assert _returned_mib("fixed") == pytest.approx(256, abs=8)
