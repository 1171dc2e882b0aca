"""VQA accuracy as the official VQAv2 evaluation computes it: answer normalisation, 3-match rule."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pali3_train.eval.inputs import check_scoring_inputs

_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # the marks the official script strips or turns into spaces
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern means "a period not between digits" but its look-behind is mistyped, so in
# effect it drops every period not followed by a digit ("5." -> "5", "2.5" kept); we match that.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                    "0 0 1 2 3 4 5 6 7 8 9 10".split()))  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Contractions as annotators also typed them, each with one apostrophe left out ("isnt",
# "couldnt've", "couldn'tve"). Forms that would capture ordinary words are not listed ("id", "ill",
# "its", "shed", "well", "were"), nor is "she's": the official map leaves "shes" alone too.
_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
    mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've
    shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
    someone's something'd something'd've something'll that's there'd there'd've there're there's
    they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
    what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
    why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
    you're you've 'ow's'at
""".split()
_CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, ch in enumerate(word) if ch == "'"
}


def normalize_answer(answer: str) -> str:
    """The official VQAv2 answer processing, in its order: punctuation, then per lower-cased word
    number words to digits, articles dropped, contractions restored.

    A listed mark is deleted when it touches a space somewhere in the answer or the answer holds a
    digit-comma-digit ("1,000" -> "1000", "red, white" -> "red white"), else it becomes a space
    ("red,white" -> "red white"); apostrophes and colons are kept."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCT:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if glue or touches_space else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean over questions of the VQA accuracy of each prediction, in [0, 1], as the official
    VQAv2 evaluation (vqaEval.py) computes it.

    A question's accuracy is min(1, matches / 3) averaged over the subsets that leave out one of the
    human answers (so with 10 annotators: 0.3 for 1 match, 0.6 for 2, 0.9 for 3, 1 from 4 on).
    Answers are stripped of surrounding whitespace; when the annotators disagree, prediction and
    answers then go through `normalize_answer`, but when all of them gave the same string the
    official script compares the stripped strings as they are, and so does this ("Yes." against
    ten "yes" scores 0, against "yes" and nine "Yes" it scores 1).
    With a single answer the leave-one-out average would always be 0; there it is a normalised
    exact match instead (not part of the official protocol, which always has ten answers)."""
    check_scoring_inputs(predictions, answers, lists="answer lists", referenced="human answers",
                         argument="answers")  # fmt: skip
    total = 0.0
    for prediction, humans in zip(predictions, answers):
        pred, humans = _strip(prediction), [_strip(h) for h in humans]
        if len(humans) == 1 or len(set(humans)) > 1:
            pred, humans = normalize_answer(pred), [normalize_answer(h) for h in humans]
        hits = [h == pred for h in humans]
        if len(hits) == 1:
            total += hits[0]
        else:  # leaving out a matching annotator leaves one match fewer among the others
            total += sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(hits)
    return total / len(predictions)


def _strip(answer: str) -> str:
    """What the official script does to every answer before anything else."""
    return answer.replace("\n", " ").replace("\t", " ").strip()
