"""The plug-in frame without a trainer: metrics named per source, and held-out data as a pass that
stops at eval.max_samples and starts again from the beginning at every evaluation."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from pali3_train.config import load_config
from pali3_train.eval.evaluator import EvalContext, evaluate, held_out
from pali3_train.tokenizer import Tokenizer
from tests.engine.conftest import stage_config

SOURCE = "digits_caption"


@dataclass(frozen=True)
class Fixed:
    """An evaluator that reports fixed metrics and which model it was given."""

    name: str
    metrics: dict[str, float]

    def run(self, model) -> dict[str, float]:
        return self.metrics | {"model": model}


def test_evaluate_names_each_metric_by_its_source():
    evaluators = [Fixed("vqa", {"accuracy": 0.5}), Fixed("ocr", {"anls": 0.25, "exact": 0.0})]
    assert evaluate(evaluators, 7) == {
        "eval/vqa/accuracy": 0.5,
        "eval/vqa/model": 7,
        "eval/ocr/anls": 0.25,
        "eval/ocr/exact": 0.0,
        "eval/ocr/model": 7,
    }


def _shard_keys(pattern_dir: Path) -> set[str]:
    """The source's sample keys as its shards hold them, read without the pipeline."""
    keys = set()
    for shard in pattern_dir.glob("*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {member.name.split(".", 1)[0] for member in tar.getmembers()}
    return keys


def _batches(demo_held_out, tmp_path: Path, max_samples: int, dtype=torch.float32):
    path = stage_config(demo_held_out, tmp_path / f"run{max_samples}",
                        eval={"max_samples": max_samples})  # fmt: skip
    cfg = load_config(path)
    source = next(s for s in demo_held_out.sources() if s.name == SOURCE)
    ctx = EvalContext(Tokenizer.load(cfg.data.tokenizer_path), image_dtype=dtype)
    return held_out(cfg, source, ctx, batch_size=3)


def _keys(batches) -> list[str]:
    return [k for batch in batches for k in batch.keys]


def test_held_out_stops_at_max_samples_and_starts_again_at_every_call(demo_held_out, tmp_path):
    capped = _batches(demo_held_out, tmp_path, max_samples=7)
    everything = _keys(_batches(demo_held_out, tmp_path, max_samples=1000)())
    assert sorted(everything) == sorted(_shard_keys(demo_held_out.out_dir / "digits"))

    first = capped()
    started = list(islice(first, 1))  # a pass left unfinished does not move the next one
    again = list(capped())
    assert [len(b) for b in again] == [3, 3, 1]
    assert _keys(again) == everything[:7]
    assert _keys(started + list(first)) == everything[:7]


def test_held_out_batches_are_model_ready(demo_held_out, tmp_path):
    """Normalised images in the context's dtype: what an evaluator feeds the model."""
    (batch, *_) = _batches(demo_held_out, tmp_path, max_samples=3, dtype=torch.bfloat16)()
    assert batch.images.dtype == torch.bfloat16
    assert -1 <= batch.images.min() < batch.images.max() <= 1
