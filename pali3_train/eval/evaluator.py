"""Held-out evaluation as plug-ins (big_vision's evaluators): each evaluator takes a model and
returns named metrics for one held-out source; the stage's spec says which evaluators a config
asks for, and the trainer only decides when to run them.

An evaluator holds its data as a callable that starts a fresh pass (``held_out``), so it can be
run again at every evaluation and tested on a plain list of batches, without a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from pali3_train.config import Config, SourceConfig
from pali3_train.data_pipeline.loader import DataPipeline
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.tokenizer import Tokenizer

Batches = Callable[[], Iterable[Batch]]  # a fresh pass over held-out batches at each call


class Evaluator(Protocol):
    name: str  # the eval source; its metrics are logged as eval/<name>/<metric>

    def run(self, model: nn.Module) -> dict[str, float]: ...


@dataclass(frozen=True)
class EvalContext:
    """What evaluators share besides the model: the tokenizer, where batches go, and the
    data-parallel ranks that evaluate together (each answers its share of every batch)."""

    tokenizer: Tokenizer
    device: torch.device = torch.device("cpu")
    image_dtype: torch.dtype = torch.float32
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None  # a torch.distributed group; None: the default group
    is_main: bool = True  # logs the examples


def held_out(cfg: Config, source: SourceConfig, ctx: EvalContext, batch_size: int) -> Batches:
    """One pass over an eval source in file order, read whole by this process (every rank reads
    the same batches) and capped at ``eval.max_samples``, as model-ready batches."""

    def batches() -> Iterator[Batch]:
        pipeline = DataPipeline(
            replace(cfg.data, sources=(source,), num_workers=0),
            image_size_px=cfg.model.vit.image_size_px,
            seed=cfg.train.seed,
            batch_size=batch_size,
            mode="epoch",
            device=ctx.device,
            image_dtype=ctx.image_dtype,
        )
        seen, limit = 0, cfg.eval.max_samples
        for batch in pipeline:
            batch = batch.rows(0, limit - seen)
            seen += len(batch)
            yield batch
            if seen >= limit:
                return

    return batches


def evaluate(evaluators: Iterable[Evaluator], model: nn.Module) -> dict[str, float]:
    """Every evaluator's metrics, named ``eval/<source>/<metric>``."""
    metrics = {}
    for evaluator in evaluators:
        found = evaluator.run(model)
        metrics |= {f"eval/{evaluator.name}/{k}": v for k, v in found.items()}
    return metrics
