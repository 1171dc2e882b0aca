"""OCR exact match and ANLS against hand-computed edit distances."""

import pytest

from pali3_train.eval.ocr import anls, exact_match


def test_exact_match_strips_whitespace_and_keeps_case():
    predictions = [" ABC-123\n", "abc-123", "Total", "x"]
    references = [["ABC-123"], ["ABC-123"], ["Sum", "Total"], ["y"]]
    # hit (stripped), miss (case), hit (second reference), miss
    assert exact_match(predictions, references) == pytest.approx(2 / 4)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # kitten -> sitting: k->s, e->i, insert g: distance 3, longer length 7, NL 3/7 < 0.5
        ("kitten", "sitting", 1 - 3 / 7),
        # saturday -> sunday: drop a, t; r->n: distance 3, length 8
        ("Saturday", "sunday", 1 - 3 / 8),
        # lower-cased and stripped before comparing: identical
        ("  Hello World ", "hello world", 1.0),
        # abc -> xyz: distance 3, NL 1 >= 0.5 -> 0
        ("abc", "xyz", 0.0),
        # ab -> ac: distance 1, NL exactly 0.5, at the threshold -> 0
        ("ab", "ac", 0.0),
        # two empty strings are identical; one empty is NL 1
        ("", "", 1.0),
        ("", "abc", 0.0),
    ],
)
def test_anls_single_reference(prediction, reference, expected):
    assert anls([prediction], [[reference]]) == pytest.approx(expected)


def test_threshold_sets_the_cutoff():
    # ab -> ac: NL 0.5. Counted below a threshold of 0.6, cut at 0.5.
    assert anls(["ab"], [["ac"]], threshold=0.6) == pytest.approx(0.5)
    assert anls(["ab"], [["ac"]], threshold=0.5) == 0.0
    # kitten -> sitting, NL 3/7 ~ 0.43: cut by a stricter threshold
    assert anls(["kitten"], [["sitting"]], threshold=0.4) == 0.0


def test_best_reference_counts_and_questions_are_averaged():
    # flaw -> lawn: drop f, add n, distance 2, NL 2/4 = 0.5 -> 0; flaw -> flew: a->e, NL 1/4
    assert anls(["flaw"], [["lawn", "flew"]]) == pytest.approx(0.75)
    # mean of 0.75, 1 and 0
    got = anls(["flaw", "Yes", "no"], [["lawn", "flew"], ["yes"], ["maybe"]])
    assert got == pytest.approx((0.75 + 1.0 + 0.0) / 3)


def test_errors_name_the_problem():
    for metric in (exact_match, anls):
        with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
            metric(["a", "b"], [["a"]])
        with pytest.raises(ValueError, match="question 1 has no reference answers"):
            metric(["a", "b"], [["a"], []])
        with pytest.raises(ValueError, match="no answers"):
            metric([], [])
        with pytest.raises(TypeError, match=r"references\[0\] is a string"):
            metric(["abc"], ["abc"])
