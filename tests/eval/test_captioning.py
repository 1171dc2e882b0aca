"""CIDEr-D against values worked by hand from the published definition, and against the COCO
caption evaluation code (pycocoevalcap 1.2) on a random corpus.

Notation for the hand computations: N images, L = ln N; an n-gram's idf is L - ln(max(1, df)) with
df the number of images whose references contain it, so on N = 2 it is 0 for n-grams in both
images' references and L otherwise (also for n-grams no reference has). Per order n the similarity
is sum_g min(c_g, r_g) * r_g / (|c| |r|) over tf-idf vectors c, r; an image's score is
10 * mean over its references of [exp(-(len_c - len_r)^2 / 72) * mean over n = 1..4 of it]."""

import math
import random

import pytest

from pali3_train.eval.captioning import cider_d, cider_d_per_image, tokenize

PENALTY_2_WORDS = math.exp(-(2**2) / (2 * 6.0**2))  # |len_c - len_r| = 2 -> exp(-1/18)


def test_two_image_corpus_by_hand():
    candidates = ["the cat sat", "a dog dog dog sat"]
    references = [["a cat sat", "a cat ran"], ["a dog sat"]]
    # df: a 2, sat 2 (idf 0); cat, ran, dog 1; every bigram and trigram 1 (idf L).
    # Image 1, candidate unigrams {the: L (df 0), cat: L, sat: 0}, |c| = sqrt(2) L.
    #   ref "a cat sat":  n=1 {a: 0, cat: L, sat: 0}, |r| = L; dot = L^2     -> 1/sqrt(2)
    #                     n=2 {a cat, cat sat}, candidate {the cat, cat sat}  -> 1 / (sqrt2 sqrt2)
    #                     n=3 {a cat sat} vs {the cat sat} -> 0; n=4 candidate has none -> 0
    #   ref "a cat ran":  n=1 {a: 0, cat: L, ran: L}, |r| = sqrt(2) L; dot = L^2 -> 1/2
    #                     n=2,3: no shared n-gram -> 0
    #   equal lengths, no penalty: 10 * ((1/sqrt2 + 1/2) / 4 + (1/2) / 4) / 2
    image_1 = 10 * ((1 / math.sqrt(2) + 0.5) / 4 + 0.5 / 4) / 2
    # Image 2, 5 words against 3: penalty exp(-1/18).
    #   n=1 candidate {a: 0, dog: 3L, sat: 0}, |c| = 3L; ref {dog: L}, |r| = L;
    #       clipped dot = min(3L, L) * L = L^2 -> 1/3 (unclipped it would be 3L^2 / 3L^2 = 1)
    #   n=2 candidate {a dog: L, dog dog: 2L, dog sat: L}, |c| = sqrt(6) L;
    #       ref {a dog: L, dog sat: L}, |r| = sqrt(2) L; dot = 2 L^2 -> 2 / sqrt(12) = 1/sqrt(3)
    #   n=3 no shared trigram -> 0; n=4 the reference has none -> 0
    image_2 = 10 * PENALTY_2_WORDS * (1 / 3 + 1 / math.sqrt(3)) / 4
    assert cider_d_per_image(candidates, references) == pytest.approx([image_1, image_2])
    assert cider_d(candidates, references) == pytest.approx((image_1 + image_2) / 2)
    assert image_1 == pytest.approx(2.133883476)  # the arithmetic above, evaluated once


def test_candidates_equal_to_references_score_the_corpus_maximum():
    # No n-gram is shared by the two images, so every weight is L > 0 and every cosine is 1.
    captions = ["a man rides a brown horse", "two dogs play in the snow"]
    assert cider_d_per_image(captions, [[c, c] for c in captions]) == pytest.approx([10.0, 10.0])
    # Two-word captions have no 3- or 4-grams: at most 10 * 2/4. "a" is in both images'
    # references, so it weighs 0, but "cat", "dog" and the bigrams still match exactly.
    assert cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)


def test_a_single_image_corpus_scores_zero():
    # N = 1: every idf is ln 1 - ln 1 = 0, so every vector is zero.
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


def test_word_order_matters_through_ngrams():
    references = [["a man rides a brown horse"], ["two dogs play in the snow"]]
    shuffled = ["a brown horse rides a man", "two dogs play in the snow"]
    # Same bag of words: n=1 cosine 1. All n-grams have weight L (df 1 or 0), counts 1, so the
    # cosine is shared / sqrt(|c| |r|):
    #   n=2 candidate {a brown, brown horse, horse rides, rides a, a man},
    #       ref {a man, man rides, rides a, a brown, brown horse}: 4 shared of 5 and 5 -> 4/5
    #   n=3 only "a brown horse" shared, 4 and 4 trigrams -> 1/4;  n=4 none shared -> 0
    scores = cider_d_per_image(shuffled, references)
    assert scores == pytest.approx([10 * (1 + 4 / 5 + 1 / 4 + 0) / 4, 10.0])


def test_clipping_stops_repeating_a_matching_word():
    references = [["a dog sat"], ["a cat ran"]]
    # idf: a 0 (both images), dog, sat, cat, ran L. Reference 1 unigrams {a: 0, dog: L, sat: L},
    # |r| = sqrt(2) L; "dog dog dog" has no matching bigram or trigram, only n=1 counts:
    #   clipped: min(3L, L) * L / (3L * sqrt(2) L) = 1 / (3 sqrt 2)
    #   (unclipped it would be 3L^2 / (3 sqrt(2) L^2) = 1/sqrt(2), and score 10/(4 sqrt 2) = 1.77)
    repeated = cider_d_per_image(["dog dog dog", "a cat ran"], references)[0]
    assert repeated == pytest.approx(10 * (1 / (3 * math.sqrt(2))) / 4)
    # Saying "dog" once: n=1 cosine L^2 / (L * sqrt(2) L) = 1/sqrt(2), penalty for 1 word vs 3.
    once = cider_d_per_image(["dog", "a cat ran"], references)[0]
    assert once == pytest.approx(10 * PENALTY_2_WORDS * (1 / math.sqrt(2)) / 4)
    assert repeated < once  # the repetition earns less despite having the reference's length


def test_length_penalty_lowers_a_too_long_candidate():
    references = [["a cat sat"], ["a dog ran"]]
    # "a" weighs 0, every other n-gram L. "a cat sat down now" against "a cat sat":
    #   n=1 candidate {a: 0, cat, sat, down, now: L}, |c| = 2L; ref {cat, sat: L}, |r| = sqrt(2) L;
    #       dot 2L^2 -> 1/sqrt(2)
    #   n=2 4 bigrams against 2, both shared -> 2 / sqrt(4 * 2) = 1/sqrt(2)
    #   n=3 3 trigrams against 1, shared -> 1/sqrt(3);  n=4 the reference has none -> 0
    #   5 words against 3: penalty exp(-1/18)
    unpenalised = 10 * (2 / math.sqrt(2) + 1 / math.sqrt(3)) / 4
    long = cider_d_per_image(["a cat sat down now", "a dog ran"], references)[0]
    assert long == pytest.approx(PENALTY_2_WORDS * unpenalised)
    assert long < unpenalised
    exact = cider_d_per_image(["a cat sat", "a dog ran"], references)[0]
    assert exact == pytest.approx(10 * 3 / 4)  # identical, three orders with n-grams


def test_tokenisation_lowercases_and_drops_punctuation():
    assert tokenize("  A Dog's toy,\tRED!  ") == ["a", "dogs", "toy", "red"]
    plain = cider_d(["a cat sitting", "a dog"], [["a cat sitting"], ["a dog running"]])
    noisy = cider_d(["A CAT, sitting!", "a dog."], [["a cat sitting."], ["A dog running"]])
    assert noisy == plain > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 candidates but 1 reference sets"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 1 has no reference captions"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no captions"):
        cider_d([], [])
    with pytest.raises(TypeError, match=r"references\[0\] is a string"):
        cider_d(["a cat"], ["a cat"])


def _random_corpus(seed: int = 0, images: int = 40) -> tuple[list[str], list[list[str]]]:
    """Lower-case, punctuation-free captions (tokenised alike by both implementations): 1-5
    references per image, a candidate that is mostly a reference with up to 4 words replaced."""
    rng = random.Random(seed)
    words = "a the man woman dog cat sits runs on in red blue park street with ball".split()

    def caption():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))

    refs = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    cands = []
    for image_refs in refs:
        tokens = rng.choice(image_refs).split()
        for _ in range(rng.randint(0, 4)):
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
        cands.append(" ".join(tokens) if rng.random() < 0.8 else caption())
    return cands, refs


# pycocoevalcap 1.2's Cider().compute_score on _random_corpus(), per image, rounded to 1e-10.
# The package is not a dependency (its wheel is 104 MB of Java tools); to regenerate:
#   pip install --no-deps --target /tmp/pce pycocoevalcap==1.2, then with /tmp/pce on sys.path:
#   Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)})
COCO_SCORES = [
    1.9313716945, 2.4756996854, 6.544443791, 3.5080780702, 1.9919575898, 7.4276581897,
    4.1119266325, 7.2473864078, 4.139549635, 5.3323007593, 0.0883544971, 1.0710594915, 0.0,
    0.6552783562, 0.6740937302, 3.1364700178, 10.0, 2.8736604639, 3.8934171713, 0.5044757509,
    1.7575007011, 0.7928578607, 0.3384014832, 3.3554880019, 10.0, 0.852446571, 1.3758194647,
    1.9709958615, 5.0, 0.6766180192, 2.1555699126, 3.6144949366, 1.2731414389, 0.5732196761,
    0.6813078939, 3.6162796798, 5.1275072505, 1.2684844481, 0.2815002248, 0.6679539552,
]  # fmt: skip
COCO_CORPUS_SCORE = 2.8246692328502667


def test_matches_the_coco_caption_code_on_a_random_corpus():
    candidates, references = _random_corpus()
    assert cider_d_per_image(candidates, references) == pytest.approx(COCO_SCORES, abs=1e-9)
    assert cider_d(candidates, references) == pytest.approx(COCO_CORPUS_SCORE, abs=1e-12)
