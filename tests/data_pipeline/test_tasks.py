"""Task formats: the PaLI-3 prompt and target each task makes from a record."""

from __future__ import annotations

import re

import numpy as np
import pytest

from data_pipeline.tasks import MissingField, format_example, template_error

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
