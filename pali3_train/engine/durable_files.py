"""DeepSpeed's checkpoint files written durably, and failing with their name.

DeepSpeed's default checkpoint engine hands ``torch.save`` a path. Two things follow: nothing is
fsynced, so a machine that loses power after a checkpoint is published (``engine.checkpoint``
renames it into place) may come back with its files empty; and a write that fails, a full disk
say, surfaces as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, naming
neither the file nor the cause. Writing to a file opened here instead makes torch report the
failed write's cause, which becomes an ``OSError`` with its errno and the path, and lets each
file be fsynced before the save reports success.
"""

from __future__ import annotations

import errno
import os
import shutil

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

FULL_BELOW = 1 << 20  # a failed write with less room left than this: the disk is full


class DurableTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's default engine with durable, self-describing writes; loading is unchanged."""

    def save(self, state_dict, path: str) -> None:
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        except RuntimeError as exc:  # torch writes to the file's descriptor itself
            code = _errno_in(str(exc), path)
            text = os.strerror(code) if code else str(exc).strip().splitlines()[0]
            raise OSError(code, text, path) from exc


def _errno_in(message: str, path: str) -> int | None:
    """The errno behind torch's write error: the one its text quotes (``write(): fd 12 failed
    with No space left on device``), or ENOSPC when it quotes none (``unexpected pos``) and the
    file system is full; None if neither."""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO):
        if os.strerror(code) in message:
            return code
    if shutil.disk_usage(os.path.dirname(path) or ".").free < FULL_BELOW:
        return errno.ENOSPC
    return None


def use_durable_files(engine) -> None:
    """Swap in the durable engine where DeepSpeed chose its default one (a user's Nebula or
    decoupled engine is left alone)."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = DurableTorchCheckpointEngine(engine._config)
