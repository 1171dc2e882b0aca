"""The one check every answer metric runs first: a prediction per item, and for each item a
non-empty list of references (not a bare string, whose characters would pass as references)."""

from __future__ import annotations

from typing import Sequence


def check_scoring_inputs(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    predicted: str = "predictions",  # what the predictions are, in messages
    referenced: str = "reference answers",  # what the references are
    lists: str = "reference lists",  # what the per-item lists are
    item: str = "question",  # what an item is
    argument: str = "references",  # the caller's parameter name
    scored: str = "answers",  # what is scored
) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} {predicted} but {len(references)} {lists}")
    if not predictions:
        raise ValueError(f"no {scored} to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(f"{argument}[{i}] is a string; pass a list of {referenced}")
        if not refs:
            raise ValueError(f"{item} {i} has no {referenced}")
