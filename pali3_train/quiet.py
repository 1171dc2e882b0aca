"""Quiet by default: what third-party libraries print that no user can act on, filtered in this
one place, each with the reason it is noise; ``--verbose`` brings it all back.

A 2-rank run otherwise prints some forty lines around its progress bar: megatron-core's notice,
on every rank and at every import, that TransformerEngine and Apex are absent (we use neither:
``pali3_train.kernels`` picks the fused paths), DeepSpeed's INFO records and the progress of its
checkpoint consolidation, torch deprecations that DeepSpeed's own calls trigger. Real warnings,
errors and everything of ours still come through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Iterator

# (category, message regex): warnings that say nothing actionable to a user of this project.
NOT_ACTIONABLE = (
    # megatron-core at import, once per module that could use them: we use neither.
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    # DeepSpeed's ZeRO collectives call this torch 2.13 deprecation; not our call to change.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    # torchdata 0.11's StatefulDataLoader calls an API torch 2.13 deprecates.
    (Warning, r"'set_vital' is deprecated"),
)
# Loggers that report their own internals at INFO (megatron's FSDP detection, DeepSpeed's
# engine set-up, MLflow's system-metrics sampler starting and stopping): WARNING and above
# unless verbose.
CHATTY_LOGGERS = ("megatron", "DeepSpeed", "deepspeed", "mlflow")


def filter_warnings() -> None:
    """Install the ``NOT_ACTIONABLE`` filters (idempotent; run when ``pali3_train`` is
    imported, before megatron-core or DeepSpeed is)."""
    for category, message in NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=message, category=category)


def configure_logging(rank: int, is_main: bool, verbose: bool = False) -> None:
    """Our records at INFO on the main rank (WARNING on the others), tagged with the rank; the
    chatty libraries at WARNING unless ``verbose``."""
    logging.basicConfig(
        level=logging.INFO if is_main or verbose else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    level = "INFO" if verbose else "WARNING"
    # MLflow sets its logger's level when it is first imported, which the tracker does lazily,
    # after this: its own variable carries the level to that import (a user's setting wins).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def library_chatter() -> Iterator[None]:
    """Swallow what a DeepSpeed call prints to stdout/stderr (its checkpoint consolidation
    prints each step and a progress bar; its CPU communication op announces its build) unless
    DeepSpeed's logger is verbose. Exceptions pass through untouched."""
    if logging.getLogger("deepspeed").isEnabledFor(logging.INFO):
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
