"""Ranks that die with their launcher.

torchrun and ``deepspeed`` start each rank in its own session, so a SIGKILL to the launcher's
process group (a user's ``kill -9``, a scheduler cleaning up a job step) does not reach the
ranks: they would train on, save and export into a run directory that a resumed job is already
using. Linux's parent-death signal ties each rank to the process that started it: when that
process dies for any reason, the kernel kills the rank (its DataLoader workers watch their own
parent and exit within seconds). SIGKILL, not SIGTERM: with the launcher gone there is no one to
coordinate a save, and the last complete checkpoint is what a resume needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; exit at once if the
    parent is already gone. False where the platform has no parent-death signal."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died between the two calls: the signal will never come
        os._exit(1)
    return True
