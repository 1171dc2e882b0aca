"""The contrastive evaluator without a trainer: on a tiny random SigLIP and held-out digits its
metrics are those computed by hand from the embeddings of every sample at once, and on a stand-in
model whose guesses are chosen its zero-shot accuracy is the one worked out by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pali3_train.config import ZeroShotConfig, load_config
from pali3_train.data_pipeline.transforms import Batch
from pali3_train.eval.embeddings import EmbeddingEvaluator
from pali3_train.eval.evaluator import EvalContext, held_out
from pali3_train.eval.retrieval import recall_at_k
from pali3_train.models import SigLIP
from pali3_train.tokenizer import Tokenizer
from tests.engine.conftest import stage_config

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASK = ZeroShotConfig("digits_caption", DIGITS, "a handwritten digit {}")
RECALL_KEYS = {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"}


@pytest.fixture
def setup(demo_held_out, tmp_path: Path):
    """(config, tokenizer, random tiny SigLIP, 12 English digit captions in batches of 5)."""
    cfg = load_config(stage_config(demo_held_out, tmp_path / "run", eval={"max_samples": 12}))
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    source = next(s for s in demo_held_out.sources() if s.name == TASK.source)
    source = replace(source, languages=("en",))  # every caption names its digit in English
    batches = list(held_out(cfg, source, EvalContext(tokenizer), batch_size=5)())
    assert [len(b) for b in batches] == [5, 5, 2]
    return cfg, tokenizer, SigLIP(cfg.model).eval(), batches


def _evaluator(setup, zero_shot=(TASK,)) -> EmbeddingEvaluator:
    cfg, tokenizer, _, batches = setup
    return EmbeddingEvaluator(TASK.source, lambda: batches, tokenizer, zero_shot,
                              cfg.data.max_target_tokens)  # fmt: skip


@torch.no_grad()
def _all_at_once(model: SigLIP, batches):
    """Image and text embeddings of every sample in one forward each, and the targets."""
    targets = torch.cat([b.target for b in batches])
    images = model.embed_images(torch.cat([b.images for b in batches]))
    return images, model.embed_texts(targets), targets


def test_recall_is_that_of_every_sample_embedded_at_once(setup):
    _, tokenizer, model, batches = setup
    images, texts, targets = _all_at_once(model, batches)
    captions = tokenizer.batch_decode(targets)
    assert len(set(captions)) < len(captions)  # repeated captions: each copy is a right answer
    same = torch.tensor([captions.index(c) for c in captions])
    metrics = _evaluator(setup).run(model)
    expected = recall_at_k(images, texts, caption_ids=same)
    assert {k: metrics[k] for k in RECALL_KEYS} == pytest.approx(expected)


def test_zero_shot_accuracy_is_the_nearest_class_prompt(setup):
    cfg, tokenizer, model, batches = setup
    images, _, targets = _all_at_once(model, batches)
    captions = tokenizer.batch_decode(targets)
    assert all(c.startswith("a handwritten digit ") for c in captions)
    labels = torch.tensor([DIGITS.index(c.split()[-1]) for c in captions])
    prompts, _ = tokenizer.batch_encode([f"a handwritten digit {d}" for d in DIGITS],
                                        cfg.data.max_target_tokens)  # fmt: skip
    with torch.no_grad():
        predicted = (images @ model.embed_texts(prompts).T).argmax(1)

    metrics = _evaluator(setup).run(model)
    assert metrics["zero_shot_accuracy"] == pytest.approx((predicted == labels).float().mean())
    assert metrics["zero_shot_chance"] == pytest.approx(1 / len(DIGITS))


def test_a_source_without_zero_shot_tasks_reports_recall_only(setup):
    _, _, model, _ = setup
    assert set(_evaluator(setup, zero_shot=()).run(model)) == RECALL_KEYS


class Guesser:
    """A stand-in model: a text embeds as the digits it names (one-hot), an image as the digit
    written in its first pixel, so which image is classified right is known in advance."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot(images[:, 0, 0, 0].long(), len(DIGITS)).float()

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(tokens)
        named = [[word in text.split() for word in DIGITS] for text in texts]
        return F.normalize(torch.tensor(named, dtype=torch.float) + 1e-3, dim=-1)


def _batch(tokenizer: Tokenizer, guesses: list[int], captions: list[str]) -> Batch:
    images = torch.tensor(guesses, dtype=torch.float)[:, None, None, None].expand(-1, 3, 2, 2)
    target, target_mask = tokenizer.batch_encode(captions, 16)
    return Batch(images, target, target_mask, target, target_mask, tuple(captions),
                 (TASK.source,) * len(captions), 0, {})  # fmt: skip


def test_zero_shot_accuracy_worked_by_hand(demo_held_out):
    """Captions naming no digit or two are left out; two of the three others are guessed right."""
    tokenizer = Tokenizer.load(demo_held_out.tokenizer_path)
    batches = [
        _batch(tokenizer, [1, 2], ["a handwritten digit one", "a handwritten digit two"]),
        _batch(tokenizer, [0, 1, 4], ["a handwritten digit three", "one and two", "a digit"]),
    ]
    evaluator = EmbeddingEvaluator(TASK.source, lambda: batches, tokenizer, (TASK,), 16)
    metrics = evaluator.run(Guesser(tokenizer))
    assert metrics["zero_shot_accuracy"] == pytest.approx(2 / 3)
    assert metrics["zero_shot_chance"] == pytest.approx(1 / 10)
