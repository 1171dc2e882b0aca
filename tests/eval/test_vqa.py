"""VQA accuracy and answer normalisation against hand-worked values of the official VQAv2 rules."""

import pytest

from pali3_train.eval.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two.", "2"),  # period not followed by a digit dropped, then number word to digit
        ("the dog", "dog"),  # article dropped
        ("An apple", "apple"),
        ("isnt", "isn't"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("yes!", "yes"),  # "!" touches no space: becomes a space, then split away
        ("None", "0"),
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("1,000", "1000"),  # digit-comma-digit: listed marks are deleted, not spaced
        ("red, white", "red white"),  # ", " touches a space: deleted
        ("red,white", "red white"),  # touches none: becomes a space
        ("T-shirt", "t shirt"),
        ("  dog's\tbowl \n", "dog's bowl"),  # apostrophes kept, whitespace collapsed
        ("10:30", "10:30"),  # colons kept
        ("its", "its"),  # not a contraction: the possessive stays
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


# Ten annotators, k of whom gave the predicted answer. Leaving out one of the k leaves k - 1
# matches among the other nine, leaving out one of the 10 - k leaves k:
#   accuracy = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
#   k=1: (1*0 + 9*(1/3)) / 10 = 0.3
#   k=2: (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
#   k=3: (3*(2/3) + 7*1) / 10 = (2 + 7) / 10 = 0.9
#   k=4: (4*1 + 6*1) / 10 = 1.0
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_ten_annotators_k_matching(k, expected):
    answers = ["two"] * k + ["three", "four", "3", "many", "five", "six", "1", "7", "8", "9"]
    assert vqa_accuracy(["2"], [answers[:10]]) == pytest.approx(expected)


def test_both_sides_are_normalised_before_matching():
    # "The dog." and "dog" and "a dog" all become "dog": 3 of 10 match -> 0.9
    answers = ["dog", "a dog", "Dog!", "cat", "cat", "cat", "cat", "puppy", "puppy", "animal"]
    assert vqa_accuracy(["The dog."], [answers]) == pytest.approx(0.9)


def test_single_answer_is_a_normalised_exact_match():
    assert vqa_accuracy(["The Dog."], [["dog"]]) == 1.0
    assert vqa_accuracy(["dogs"], [["dog"]]) == 0.0
    # ten identical annotators score the same
    assert vqa_accuracy(["The Dog."], [["dog"] * 10]) == 1.0


def test_mean_over_questions():
    answers = [["yes"] * 10, ["2", "2"] + ["3"] * 8]
    assert vqa_accuracy(["Yes", "two"], answers) == pytest.approx((1.0 + 0.6) / 2)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="question 0 has no human answers"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError, match="no answers"):
        vqa_accuracy([], [])
    with pytest.raises(TypeError, match=r"answers\[0\] is a string"):
        vqa_accuracy(["yes"], ["yes"])
