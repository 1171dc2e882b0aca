"""CIDEr-D, the COCO captioning metric: TF-IDF n-gram consensus of a caption with its references."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from pali3_train.eval.inputs import check_scoring_inputs

_MAX_N = 4  # n-grams of orders 1..4, weighted uniformly
_SIGMA = 6.0  # standard deviation of the Gaussian length penalty, in words
_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-case, delete punctuation, split on whitespace.

    The COCO evaluation server tokenises with the Java PTB tokenizer (run as a JVM subprocess) and
    then drops punctuation tokens. We replace it so that evaluation needs no Java on training nodes.
    The two agree on plain captions and differ only on words with inner punctuation (PTB gives
    "dog 's" and "black-and-white", this gives "dogs" and "blackandwhite"), so scores are close to,
    not bit-identical with, the server's."""
    return _PUNCT.sub("", text.lower()).split()


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D, the mean over images of `cider_d_per_image`: 1.0 is what papers print as
    100 (the scale of the COCO evaluation code)."""
    scores = cider_d_per_image(candidates, references)
    return sum(scores) / len(scores)


def cider_d_per_image(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> list[float]:
    """CIDEr-D of each image's one candidate against its references (Vedantam et al. 2015, with the
    clipping and length penalty of the COCO server's CIDEr-D).

    Per n-gram order, candidate and reference are TF-IDF vectors; the document frequency of an
    n-gram is the number of images whose reference set contains it, so the idf log(N / max(1, df))
    is a property of the evaluated corpus: n-grams common to every image's references weigh 0, and
    on a corpus of a single image every weight, hence every score, is 0. The similarity is a cosine
    whose numerator clips each candidate weight at the reference's (repeating a word earns nothing
    past its count in the reference), times exp(-(len_c - len_r)^2 / (2 * 6^2)); it is averaged
    over n = 1..4 and over the references, and multiplied by 10. A candidate equal to all its
    references therefore scores 10 * (orders it has with some non-zero weight) / 4."""
    check_scoring_inputs(
        candidates,
        references,
        predicted="candidates",
        lists="reference sets",
        referenced="reference captions",
        item="image",
        scored="captions",
    )
    cands = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in image_refs] for image_refs in references]
    ref_counts = [[_ngram_counts(r) for r in image_refs] for image_refs in refs]
    df: Counter[tuple[str, ...]] = Counter()
    for image_counts in ref_counts:
        df.update({g for counts in image_counts for order in counts for g in order})
    log_images = math.log(len(refs))

    def tf_idf(counts: list[Counter]) -> list[tuple[dict, float]]:
        """Per order: the weight of each n-gram and the vector's Euclidean norm."""
        out = []
        for order in counts:
            vec = {g: c * (log_images - math.log(max(1, df[g]))) for g, c in order.items()}
            out.append((vec, math.sqrt(sum(w * w for w in vec.values()))))
        return out

    scores = []
    for cand, image_refs, image_counts in zip(cands, refs, ref_counts):
        cand_vec = tf_idf(_ngram_counts(cand))
        sims = [
            _similarity(cand_vec, tf_idf(counts), len(cand) - len(ref))
            for ref, counts in zip(image_refs, image_counts)
        ]
        scores.append(10.0 * sum(sims) / len(sims))
    return scores


def _ngram_counts(tokens: list[str]) -> list[Counter]:
    return [
        Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        for n in range(1, _MAX_N + 1)
    ]


def _similarity(cand: list[tuple[dict, float]], ref: list[tuple[dict, float]], delta: int) -> float:
    """Mean over orders of the clipped cosine, times the Gaussian length penalty."""
    total = 0.0
    for (c_vec, c_norm), (r_vec, r_norm) in zip(cand, ref):
        if c_norm > 0 and r_norm > 0:
            dot = sum(min(w, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, w in c_vec.items())
            total += dot / (c_norm * r_norm)
    return total / _MAX_N * math.exp(-(delta**2) / (2 * _SIGMA**2))
