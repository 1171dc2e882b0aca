"""Task formats: the PaLI-3 prompt and target each task makes from a record."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pali3_train.data_pipeline.tasks import (
    MissingField,
    format_example,
    format_record,
    template_error,
)

RECORD = {
    "caption": {"en": "a red circle", "de": "ein roter Kreis"},
    "alt_text": {"en": "a photo of three red circles on grass"},
    "vqa": {"en": [["what colour?", "red"], ["how many?", "three"]]},
    "ocr": {"el": "καλημέρα"},
}


def _format(task, languages=("en",), template=None, seed=0, record=RECORD):
    return format_example(task, record, languages, np.random.default_rng(seed), template)


def test_each_task_makes_a_pali_prompt_and_target():
    assert _format("caption") == ("Caption in EN:", "a red circle")
    assert _format("alt_text") == (
        "Generate the alt_text in EN at 0:",
        "a photo of three red circles on grass",
    )
    assert _format("ocr", ("el",)) == ("Generate the ocr_text in EL:", "καλημέρα")
    assert _format("vqa") in {
        ("Answer in EN: what colour?", "red"),
        ("Answer in EN: how many?", "three"),
    }


def test_split_captioning_gives_a_prefix_and_asks_for_the_rest():
    words = RECORD["alt_text"]["en"].split()
    positions = set()
    for seed in range(40):
        prompt, target = _format("split_caption", seed=seed)
        match = re.fullmatch(r"Generate the alt_text in EN at (\d+):(.*)", prompt)
        pos = int(match.group(1))
        positions.add(pos)
        assert match.group(2).split() == words[:pos] and target.split() == words[pos:]
    assert len(positions) > 3


def test_languages_are_drawn_among_those_the_record_has():
    seen = {_format("caption", ("en", "de", "fr"), seed=s)[0] for s in range(30)}
    assert seen == {"Caption in EN:", "Caption in DE:"}


def test_a_source_template_replaces_the_default():
    prompt, target = _format("vqa", template="Q ({lang}): {question}", seed=1)
    assert prompt.startswith("Q (EN): ") and target in ("red", "three")


@pytest.mark.parametrize(
    "task,record,languages,words",
    [
        ("caption", {"vqa": {}}, ("en",), "no 'caption' field"),
        ("caption", RECORD, ("fr",), "none of the languages ['fr']"),
        ("vqa", {"vqa": {"en": []}}, ("en",), "non-empty list"),
        ("vqa", {"vqa": {"en": [["only a question"]]}}, ("en",), "pair"),
        ("caption", {"caption": {"en": "  "}}, ("en",), "non-empty text"),
    ],
)
def test_what_a_task_needs_missing_is_reported(task, record, languages, words):
    with pytest.raises(MissingField, match=re.escape(words)):
        _format(task, languages, record=record)


def test_templates_are_checked_against_the_task():
    assert template_error("vqa", "Answer in {lang}: {question}") is None
    assert "unknown placeholder {question}" in template_error("caption", "{question}")
    assert "not a valid template" in template_error("caption", "Caption {lang")


MULTI = {
    "caption": {"en": ["a dog on a sofa", "a brown dog", "a dog resting"]},
    "vqa": {"en": [["what is it?", ["dog", "dog", "puppy"]]]},
    "ocr": {"en": ["EXIT", "exit"]},
}


@pytest.mark.parametrize(
    "task,references",
    [
        ("caption", ("a dog on a sofa", "a brown dog", "a dog resting")),
        ("alt_text", ("a dog on a sofa", "a brown dog", "a dog resting")),
        ("vqa", ("dog", "dog", "puppy")),
        ("ocr", ("EXIT", "exit")),
    ],
)
def test_a_list_trains_on_one_reference_and_keeps_them_all(task, references):
    record = MULTI | {"alt_text": MULTI["caption"]}
    targets = set()
    for seed in range(30):
        formatted = format_record(task, record, ["en"], np.random.default_rng(seed))
        assert formatted.references == references and formatted.target in references
        targets.add(formatted.target)
    assert targets == set(references)  # every reference gets drawn


def test_the_drawn_reference_follows_the_generator():
    # The worker's generator draws it, so the same generator state (a resumed checkpoint's)
    # draws the same target.
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    first = [format_record("caption", MULTI, ["en"], rng).target for _ in range(10)]
    rng.bit_generator.state = state
    assert [format_record("caption", MULTI, ["en"], rng).target for _ in range(10)] == first


def test_a_single_text_draws_nothing_more_than_before():
    # Records without lists give the targets and generator states they always did: only the
    # language (and the vqa pair) is drawn.
    for task, draws in (("caption", [1]), ("vqa", [1, 2])):  # the language, then the pair
        rng, expected = np.random.default_rng(3), np.random.default_rng(3)
        formatted = format_record(task, RECORD, ["en"], rng)
        for high in draws:
            expected.integers(high)
        assert formatted.references == ()
        assert rng.bit_generator.state == expected.bit_generator.state


def test_split_captioning_continues_one_listed_alt_text():
    record = {"alt_text": {"en": ["one two three", "four five six"]}}
    formatted = format_record("split_caption", record, ["en"], np.random.default_rng(0))
    assert formatted.references == () and formatted.target


@pytest.mark.parametrize(
    "record,words",
    [
        ({"caption": {"en": []}}, "non-empty list of references"),
        ({"caption": {"en": ["a dog", ""]}}, "non-empty text"),
        ({"vqa": {"en": [["what?", []]]}}, "non-empty list of references"),
    ],
)
def test_bad_reference_lists_are_missing_fields(record, words):
    task = next(iter(record))
    with pytest.raises(MissingField, match=words):
        format_record(task, record, ["en"], np.random.default_rng(0))
