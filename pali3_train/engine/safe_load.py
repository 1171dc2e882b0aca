"""DeepSpeed's checkpoint files read without running code from them.

DeepSpeed calls ``torch.load(..., weights_only=False)`` on its own files, which unpickles
anything: a checkpoint from an untrusted source could run code on every rank. Inside
``weights_only_loads()`` torch is forced (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) to its restricted
unpickler, which accepts tensors, containers and plain values, plus the few DeepSpeed types its
checkpoints hold (``DEEPSPEED_TYPES``). A file holding anything else is refused with the type
named. ``--trust-checkpoint`` turns this off for checkpoints that need more (a different
DeepSpeed version's types, say), and is the stated trust boundary (docs/reliability.md).

    python -m pali3_train.engine.safe_load <ds_to_universal arguments>

runs DeepSpeed's conversion to its universal format under the same rule (it is a subprocess).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

import torch

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# Found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, fp32/bf16/fp16
# checkpoints and their universal conversions; nothing here has code that runs on load.
DEEPSPEED_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.checkpoint.universal_checkpoint.SubparamShape",
)


def allowed_types() -> list[type]:
    """The allow-listed classes of this DeepSpeed version (one it lacks is left out)."""
    found = []
    for dotted in DEEPSPEED_TYPES:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def weights_only_loads(enabled: bool = True) -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's too) uses the restricted unpickler with the
    allow-list; ``enabled=False`` (``--trust-checkpoint``) leaves loading as DeepSpeed does it."""
    if not enabled:
        yield
        return
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed_types()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def _convert_to_universal(argv: list[str]) -> None:
    from deepspeed.checkpoint import ds_to_universal

    torch.serialization.add_safe_globals(allowed_types())  # also seen by forked workers
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    sys.argv = ["python -m pali3_train.engine.safe_load", *argv]  # its usage line, as typed
    ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    _convert_to_universal(sys.argv[1:])
