"""Task formats: how a shard record becomes a PaLI-3 (prompt, target) pair.

A record holds one field per task, each keyed by language code, so one image can serve several
tasks and languages::

    {"caption":  {"en": "a red circle at the top left", "de": "..."},
     "alt_text": {"en": "..."},                 # alt_text and split_caption
     "vqa":      {"en": [["what colour is the circle?", "red"], ...]},
     "ocr":      {"en": "the text drawn in the image"}}

Prompts follow PaLI's phrasing with upper-case language codes ("Answer in EN: ..."); a mixture
source may replace a task's template but only with the placeholders that task fills.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable, Sequence, get_args

import numpy as np

from pali3_train.config.schema import TaskName


class MissingField(KeyError):
    """The record lacks what the task needs (the field, or any of the source's languages)."""


@dataclass(frozen=True)
class Task:
    record_field: str
    default_prompt: str
    placeholders: frozenset[str]
    # (text for the chosen language, template, lang, rng) -> (prompt, target)
    render: Callable[[object, str, str, np.random.Generator], tuple[str, str]]


def _caption(text, template, lang, rng):
    return template.format(lang=lang.upper()), _text(text)


def _alt_text(text, template, lang, rng):
    return template.format(lang=lang.upper(), pos=0, prefix="").strip(), _text(text)


def _split_caption(text, template, lang, rng):
    """PaLI's split-captioning: the first ``pos`` words are given in the prompt and the model
    continues the alt-text from there."""
    words = _text(text).split()
    pos = int(rng.integers(len(words)))
    prompt = template.format(lang=lang.upper(), pos=pos, prefix=" ".join(words[:pos]))
    return prompt.strip(), " ".join(words[pos:])


def _vqa(pairs, template, lang, rng):
    if not isinstance(pairs, list) or not pairs:
        raise MissingField("vqa: expected a non-empty list of [question, answer] pairs")
    pair = pairs[int(rng.integers(len(pairs)))]
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
        raise MissingField("vqa: each item must be a [question, answer] pair")
    return template.format(lang=lang.upper(), question=_text(pair[0])), _text(pair[1])


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MissingField(f"expected non-empty text, got {value!r}")
    return value.strip()


ALT_TEXT_PROMPT = "Generate the alt_text in {lang} at {pos}: {prefix}"
TASKS: dict[str, Task] = {
    "caption": Task("caption", "Caption in {lang}:", frozenset({"lang"}), _caption),
    "alt_text": Task("alt_text", ALT_TEXT_PROMPT, frozenset({"lang", "pos", "prefix"}), _alt_text),
    "split_caption": Task(
        "alt_text", ALT_TEXT_PROMPT, frozenset({"lang", "pos", "prefix"}), _split_caption
    ),
    "vqa": Task("vqa", "Answer in {lang}: {question}", frozenset({"lang", "question"}), _vqa),
    "ocr": Task("ocr", "Generate the ocr_text in {lang}:", frozenset({"lang"}), _caption),
}
assert set(TASKS) == set(get_args(TaskName)), "config.schema.TaskName and TASKS disagree"


def template_error(task: str, template: str) -> str | None:
    """Why ``template`` cannot be used for ``task``, or None if it can."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"not a valid template ({exc})"
    unknown = used - TASKS[task].placeholders
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in sorted(TASKS[task].placeholders))
        return f"unknown placeholder {{{sorted(unknown)[0]}}} for task {task} (allowed: {allowed})"
    return None


def format_example(
    task: str,
    record: dict,
    languages: Sequence[str],
    rng: np.random.Generator,
    template: str | None = None,
) -> tuple[str, str]:
    """-> (prompt, target). The language is drawn among the source's ``languages`` that the
    record has, so a multilingual source can mix languages per sample."""
    spec = TASKS[task]
    field = record.get(spec.record_field)
    if not isinstance(field, dict):
        raise MissingField(f"no {spec.record_field!r} field")
    present = [lang for lang in languages if lang in field]
    if not present:
        raise MissingField(f"{spec.record_field!r} has none of the languages {list(languages)}")
    lang = present[int(rng.integers(len(present)))]
    return spec.render(field[lang], template or spec.default_prompt, lang, rng)
