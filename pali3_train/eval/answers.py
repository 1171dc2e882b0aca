"""The generative objective's evaluator: answers decoded for one held-out source's prompts and
scored by its task (``scoring``), shared out over the data-parallel ranks.

Each rank answers its share of every held-out batch; a rank whose share is empty decodes a
stand-in and drops it, and decoding stops when every rank is done, so all ranks run the same
forwards (ZeRO-3 gathers weights in each). The answers then meet on every rank, in batch order.

An answer is scored against every reference its record holds (``Batch.references``: COCO's five
captions, VQAv2's ten answers); a row without them has its decoded target as its one reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from pali3_train.config.schema import TaskName
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.engine.distributed import all_ranks_agree
from pali3_train.eval.evaluator import Batches, EvalContext
from pali3_train.eval.scoring import score_answers
from pali3_train.models import PaLI3
from pali3_train.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def generate_answers(
    model: PaLI3,
    tokenizer: Tokenizer,
    batch: Batch,
    max_len: int,
    beam_size: int = 1,
    all_finished: Callable[[torch.Tensor], bool] | None = None,
) -> list[str]:
    """The decoded answer to each (image or clip, prompt) of a model-ready ``batch``."""
    options = {"all_finished": all_finished} if all_finished else {}
    tokens = model.generate(batch.images, batch.prompt, batch.prompt_mask, max_len, beam_size,
                            frame_mask=batch.frame_mask, **options)  # fmt: skip
    return tokenizer.batch_decode(tokens)


@dataclass(frozen=True)
class AnswerEvaluator:
    name: str
    task: TaskName
    batches: Batches  # each holds every rank's share: share x dp_size rows
    ctx: EvalContext
    share: int  # rows each rank answers per batch
    max_decode_tokens: int = 32
    beam_size: int = 1

    @torch.no_grad()
    def run(self, model: PaLI3) -> dict[str, float]:
        answers, references = [], []
        rank, tokenizer = self.ctx.dp_rank, self.ctx.tokenizer
        for batch in self.batches():
            part = batch.rows(rank * self.share, (rank + 1) * self.share)
            texts = generate_answers(model, tokenizer, part if len(part) else batch.rows(0, 1),
                                     self.max_decode_tokens, self.beam_size,
                                     self._all_ranks_finished)  # fmt: skip
            if len(part):
                answers += texts
                references += _references(part, tokenizer)
        answers, references = self._gather(answers, references)
        if self.ctx.is_main:
            for answer, refs in list(zip(answers, references))[:3]:
                log.debug("eval %s: %r (references %r)", self.name, answer, refs)
        return score_answers(self.task, answers, references) | {"samples": float(len(answers))}

    def _gather(self, answers: list[str], references: list[list[str]]):
        """Every rank's (answers, references), concatenated in rank order."""
        shares: list = [None] * self.ctx.dp_size
        dist.all_gather_object(shares, (answers, references), group=self.ctx.dp_group)
        answers = [a for share_answers, _ in shares for a in share_answers]
        references = [r for _, share_refs in shares for r in share_refs]
        return answers, references

    def _all_ranks_finished(self, finished: torch.Tensor) -> bool:
        # Over the whole world, not the data-parallel group: tensor-parallel peers decode the same
        # rows and must run the same forwards too. The answers are gathered over the
        # data-parallel group only, since those peers hold identical copies.
        return not all_ranks_agree(not bool(finished.all()), self.ctx.device)


def _references(batch: Batch, tokenizer: Tokenizer) -> list[list[str]]:
    """Each row's references: all those of its record, else its decoded target."""
    decoded = tokenizer.batch_decode(batch.target)
    listed = batch.references or ((),) * len(decoded)
    return [list(refs) if refs else [target] for refs, target in zip(listed, decoded)]
