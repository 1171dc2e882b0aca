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


def test_unanimous_annotators_are_compared_unnormalised_as_the_official_script_does():
    # vqaEval.py normalises only `if len(set(gtAnswers)) > 1`; before that, every answer and the
    # prediction lose surrounding whitespace (and "\n", "\t" become spaces).
    assert vqa_accuracy(["The Dog."], [["dog"] * 10]) == 0.0
    assert vqa_accuracy(["Yes"], [["yes"] * 10]) == 0.0
    assert vqa_accuracy([" yes\n"], [["yes"] * 10]) == 1.0
    # One annotator typed "Yes": the answers disagree, so all are normalised and all 10 match.
    assert vqa_accuracy(["Yes."], [["Yes"] + ["yes"] * 9]) == 1.0


def test_a_vqav2_question_by_hand():
    # Normalised: "two", "2", "Two." and " 2" all become "2" -> 4 matches of 10 -> 1.0;
    # "isnt" and "isn't" are one answer -> 3 matches -> 0.9; "3 " -> 3 matches -> 0.9.
    answers = ["two", "2", "Two.", " 2", "3", "3", "3 ", "isnt", "isn't", "isn't"]
    assert vqa_accuracy(["2"], [answers]) == pytest.approx(1.0)
    assert vqa_accuracy(["isn't"], [answers]) == pytest.approx(0.9)
    assert vqa_accuracy(["three"], [answers]) == pytest.approx(0.9)
    assert vqa_accuracy(["four"], [answers]) == 0.0
    assert normalize_answer("owsat") == "owsat" and normalize_answer("ow's'at") == "'ow's'at"


def test_mean_over_questions():
    answers = [["yes"] * 10, ["2", "2"] + ["3"] * 8]
    assert vqa_accuracy(["yes", "two"], answers) == pytest.approx((1.0 + 0.6) / 2)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="question 0 has no human answers"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError, match="no answers"):
        vqa_accuracy([], [])
    with pytest.raises(TypeError, match=r"answers\[0\] is a string"):
        vqa_accuracy(["yes"], ["yes"])
