"""The generative evaluator without a trainer, in a real one-rank process group on a tiny random
PaLI-3: its scores are the task's scores of the answers decoded batch by batch, whatever the share
of each batch (2 ranks: tests/engine/test_evaluation.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.eval.answers import AnswerEvaluator, _references, generate_answers
from pali3_train.eval.evaluator import EvalContext, held_out
from pali3_train.eval.scoring import score_answers
from pali3_train.models import PaLI3
from pali3_train.tokenizer import Tokenizer
from tests.engine.conftest import one_rank, stage_config  # noqa: F401 (a fixture)

SOURCE, TASK, DECODE = "text_ocr", "ocr", 6


def _partly_answered(batches, answers, tokenizer: Tokenizer):
    """Every other row's reference replaced by the model's own answer: a score strictly between
    0 and 1, which answers scored against another row's reference would change."""
    found = []
    for batch, batch_answers in zip(batches, answers):
        refs = tokenizer.batch_decode(batch.target)
        texts = [a if i % 2 else r for i, (a, r) in enumerate(zip(batch_answers, refs))]
        target, target_mask = tokenizer.batch_encode(texts, batch.target.shape[1])
        found.append(replace(batch, target=target, target_mask=target_mask))
    return found


@pytest.mark.usefixtures("one_rank")  # the evaluator's collectives need a process group
def test_scores_are_those_of_the_answers_decoded_batch_by_batch(demo_held_out, tmp_path: Path):
    """Batches of 3 and 2 for shares of 3: the last batch has fewer rows than the share."""
    cfg = load_config(stage_config(demo_held_out, tmp_path / "run", eval={"max_samples": 5}))
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    ctx = EvalContext(tokenizer)
    source = next(s for s in demo_held_out.sources() if s.name == SOURCE)
    read = list(held_out(cfg, source, ctx, batch_size=3)())
    assert [len(b) for b in read] == [3, 2]
    model = PaLI3(cfg.model).eval()
    answers = [generate_answers(model, tokenizer, batch, DECODE) for batch in read]
    batches = _partly_answered(read, answers, tokenizer)

    references = [[r] for batch in batches for r in tokenizer.batch_decode(batch.target)]
    expected = score_answers(TASK, [a for part in answers for a in part], references)
    assert 0 < expected["exact_match"] < 1
    evaluator = AnswerEvaluator(SOURCE, TASK, lambda: batches, ctx, 3, DECODE)
    assert evaluator.run(model) == pytest.approx(expected | {"samples": 5.0})


class _Decoder:
    def batch_decode(self, tokens):
        return [f"decoded {int(row[0])}" for row in tokens]


def test_rows_are_scored_against_all_their_references_else_the_target():
    ids = torch.tensor([[7], [8]])
    batch = Batch(torch.zeros(2, 3, 1, 1), ids, ids > 0, ids, ids > 0, ("a", "b"), ("s", "s"), 0,
                  {}, (0, 0), (("a dog", "a brown dog"), ()))  # fmt: skip
    assert _references(batch, _Decoder()) == [["a dog", "a brown dog"], ["decoded 8"]]
    assert _references(batch.rows(1, 2), _Decoder()) == [["decoded 8"]]
    unlisted = Batch(*[getattr(batch, f) for f in ("images", "prompt", "prompt_mask")],
                     ids, ids > 0, ("a", "b"), ("s", "s"), 0, {})  # fmt: skip
    assert _references(unlisted, _Decoder()) == [["decoded 7"], ["decoded 8"]]


def test_video_tasks_are_scored_by_cider_d_and_vqa_accuracy():
    """Hand-worked: two captions equal to their one reference score CIDEr-D's corpus maximum,
    5 (tests/eval/test_captioning.py); an answer two of ten annotators gave scores 0.6."""
    captions = score_answers("video_caption", ["a cat", "a dog"], [["a cat"], ["a dog"]])
    assert captions == pytest.approx({"cider": 5.0})
    answers = ["red"] * 2 + ["blue"] * 8
    assert score_answers("video_qa", ["red"], [answers]) == pytest.approx({"vqa_accuracy": 0.6})
