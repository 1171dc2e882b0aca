"""Task formats: how a shard record becomes a PaLI-3 (prompt, target) pair.

A record holds one field per task, each keyed by language code, so one image can serve several
tasks and languages::

    {"caption":  {"en": "a red circle at the top left", "de": "..."},
     "alt_text": {"en": "..."},                 # alt_text and split_caption
     "vqa":      {"en": [["what colour is the circle?", "red"], ...]},
     "ocr":      {"en": "the text drawn in the image"}}

Every reference. Where a dataset has several (COCO's five captions, VQAv2's ten answers), a text
may be a list of them instead: ``"caption": {"en": ["a dog on a sofa", "a brown dog", ...]}``,
``"vqa": {"en": [["what is it?", ["dog", "dog", "puppy", ...]], ...]}``; likewise for alt_text and
ocr. Training takes one of them, drawn with the worker's generator (whose state a checkpoint
keeps, so a resume draws the same ones); evaluation scores against all of them
(``Formatted.references``). A plain string draws nothing, so records without lists give exactly
the prompts and targets they always did.

The video tasks read the same fields as their image counterparts (``video_caption`` the caption,
``video_qa`` the vqa pairs); only the sample's media differs.

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
class Formatted:
    """One training example made from a record: the prompt, the target the model learns, and
    every reference an evaluation scores the answer against. ``references`` is empty where the
    record gave a single text (the target is then the one reference)."""

    prompt: str
    target: str
    references: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    record_field: str
    default_prompt: str
    placeholders: frozenset[str]
    # (text for the chosen language, template, lang, rng) -> Formatted
    render: Callable[[object, str, str, np.random.Generator], Formatted]


def _caption(text, template, lang, rng):
    target, references = _one_of(text, rng)
    return Formatted(template.format(lang=lang.upper()), target, references)


def _alt_text(text, template, lang, rng):
    target, references = _one_of(text, rng)
    return Formatted(
        template.format(lang=lang.upper(), pos=0, prefix="").strip(), target, references
    )


def _split_caption(text, template, lang, rng):
    """PaLI's split-captioning: the first ``pos`` words are given in the prompt and the model
    continues the alt-text from there (the continuation of the alt-text drawn is the one
    reference)."""
    words = _one_of(text, rng)[0].split()
    pos = int(rng.integers(len(words)))
    prompt = template.format(lang=lang.upper(), pos=pos, prefix=" ".join(words[:pos]))
    return Formatted(prompt.strip(), " ".join(words[pos:]))


def _vqa(pairs, template, lang, rng):
    if not isinstance(pairs, list) or not pairs:
        raise MissingField("vqa: expected a non-empty list of [question, answer] pairs")
    pair = pairs[int(rng.integers(len(pairs)))]
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
        raise MissingField("vqa: each item must be a [question, answer] pair")
    target, references = _one_of(pair[1], rng)
    return Formatted(
        template.format(lang=lang.upper(), question=_text(pair[0])), target, references
    )


def _one_of(value: object, rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """A text, or a list of references -> (the target, every reference). A list's target is
    drawn uniformly, so an answer that several annotators gave is drawn that much more often;
    a string draws nothing (the generator advances as it did before lists existed)."""
    if not isinstance(value, list):
        return _text(value), ()
    if not value:
        raise MissingField("expected a non-empty list of references, got []")
    references = tuple(_text(v) for v in value)
    return references[int(rng.integers(len(references)))], references


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
    # A clip of frames instead of an image; the records read alike (docs/video.md).
    "video_caption": Task("caption", "Caption the video in {lang}:", frozenset({"lang"}), _caption),
    "video_qa": Task("vqa", "Answer in {lang}: {question}", frozenset({"lang", "question"}), _vqa),
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
    formatted = format_record(task, record, languages, rng, template)
    return formatted.prompt, formatted.target


def format_record(
    task: str,
    record: dict,
    languages: Sequence[str],
    rng: np.random.Generator,
    template: str | None = None,
) -> Formatted:
    """`format_example` with every reference the record holds for the drawn text."""
    spec = TASKS[task]
    field = record.get(spec.record_field)
    if field is None:
        found = ", ".join(sorted(record)) or "none"
        raise MissingField(f"no {spec.record_field!r} field (fields: {found})")
    if not isinstance(field, dict):
        raise MissingField(
            f"{spec.record_field!r} is a {type(field).__name__}, not a {{language: text}} map "
            "(shards of plain captions are read with format: img2dataset)"
        )
    present = [lang for lang in languages if lang in field]
    if not present:
        raise MissingField(
            f"{spec.record_field!r} has none of the languages {list(languages)} "
            f"(it has {sorted(field)})"
        )
    lang = present[int(rng.integers(len(present)))]
    return spec.render(field[lang], template or spec.default_prompt, lang, rng)
