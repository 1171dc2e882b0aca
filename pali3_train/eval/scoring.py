"""Which metrics score a task's generated answers: one table, read by the trainer's evaluation."""

from __future__ import annotations

from typing import Callable, Sequence

from pali3_train.config.schema import TaskName
from pali3_train.eval.captioning import cider_d
from pali3_train.eval.ocr import anls, exact_match
from pali3_train.eval.vqa import vqa_accuracy

Metric = Callable[[Sequence[str], Sequence[Sequence[str]]], float]

CAPTIONING: dict[str, Metric] = {"cider": cider_d}
QUESTION_ANSWERING: dict[str, Metric] = {"vqa_accuracy": vqa_accuracy}
# A video's answers are scored as an image's: MSR-VTT and VATEX captions by CIDEr-D, MSR-VTT-QA
# and ActivityNet-QA by VQA accuracy (as PaLI-3 reports them).
METRICS_BY_TASK: dict[TaskName, dict[str, Metric]] = {
    "caption": CAPTIONING,
    "alt_text": CAPTIONING,
    "split_caption": CAPTIONING,
    "vqa": QUESTION_ANSWERING,
    "ocr": {"exact_match": exact_match, "anls": anls},
    "video_caption": CAPTIONING,
    "video_qa": QUESTION_ANSWERING,
}


def score_answers(
    task: TaskName, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """predictions[i] against the reference answers references[i] -> {metric name: value}."""
    return {name: metric(predictions, references) for name, metric in METRICS_BY_TASK[task].items()}
