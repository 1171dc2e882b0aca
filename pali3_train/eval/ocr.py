"""OCR answer metrics: exact match, and ANLS as ST-VQA and DocVQA score reading answers."""

from __future__ import annotations

from collections.abc import Sequence

from pali3_train.eval.inputs import check_scoring_inputs


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references after stripping surrounding
    whitespace. Case-sensitive, since the case of transcribed text is part of reading it."""
    check_scoring_inputs(predictions, references)
    hits = sum(p.strip() in {r.strip() for r in refs} for p, refs in zip(predictions, references))
    return hits / len(predictions)


def anls(
    predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5
) -> float:
    """Average Normalized Levenshtein Similarity (Biten et al. 2019), in [0, 1].

    Per question, the best over its references of 1 - NL, where NL is the edit distance over the
    longer string's length, on lower-cased, stripped strings. An NL at or above `threshold` counts
    0: past it the answer is taken to be a wrong one rather than a misread right one. Two empty
    strings are identical (similarity 1)."""
    check_scoring_inputs(predictions, references)
    total = 0.0
    for prediction, refs in zip(predictions, references):
        pred = prediction.strip().lower()
        total += max(_similarity(pred, r.strip().lower(), threshold) for r in refs)
    return total / len(predictions)


def _similarity(a: str, b: str, threshold: float) -> float:
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    nl = _levenshtein(a, b) / longest
    return 1.0 - nl if nl < threshold else 0.0


def _levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions, row by row."""
    prev = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
