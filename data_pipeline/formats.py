"""Shard layouts: how one sample's tar members become a training sample.

- ``pali3`` (what ``write_shards`` writes): a ``.json`` member that is the record itself, one
  field per task keyed by language (``tasks.py``).
- ``img2dataset``: what img2dataset writes, and so what LAION, DataComp and CC12M downloads look
  like: the image, the caption as ``.txt`` and a ``.json`` of metadata (url, size, status, ...).
  The source's ``fields`` say where the text is (a member, or a key of the JSON) and its
  language (fixed, or a key); everything else in the sample is ignored. The text becomes the
  one field the source's task reads, so such a source trains stage 0 and captioning as is.

A sample that cannot be used raises ``Rejected`` with the reason it is counted under
(``health.SKIP_REASONS``) and what was found instead, so that a whole source of them can be
refused with a useful line before training.
"""

from __future__ import annotations

import json

import numpy as np

from pali3_train.config.schema import FieldMapping, SourceConfig
from pali3_train.data_pipeline.tasks import TASKS, MissingField, format_record
from pali3_train.data_pipeline.transforms import IMAGE_FIELDS, Sample, decode_image

JSON_KEY = "json:"


class Rejected(ValueError):
    """One sample is unusable: ``reason`` is its skip counter, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def prepare_sample(
    spec: SourceConfig, raw: dict, rng: np.random.Generator, image_size_px: int
) -> Sample:
    """A raw webdataset sample -> a decoded training sample of source ``spec``, or ``Rejected``.
    ``rng`` draws the language and reference, so it must be the worker's resumable generator."""
    record = read_record(spec, raw)
    try:
        formatted = format_record(spec.task, record, spec.languages, rng, spec.prompt)
    except MissingField as exc:
        raise Rejected("missing_field", exc.args[0]) from None
    image_field = next((f for f in IMAGE_FIELDS if f in raw), None)
    if image_field is None:
        extensions = "/".join(f".{f}" for f in IMAGE_FIELDS)
        raise Rejected("missing_field", f"no {extensions} member (members: {members(raw)})")
    try:
        image = decode_image(raw[image_field], image_size_px)
    except Exception as exc:  # PIL raises many types for bad data
        raise Rejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return Sample(raw.get("__key__", "?"), spec.name, image, formatted.prompt, formatted.target,
                  raw.get("__epoch__", 0), formatted.references)  # fmt: skip


def read_record(spec: SourceConfig, raw: dict) -> dict:
    """A raw webdataset sample (``{"__key__": ..., "<member extension>": bytes}``) -> the record
    ``tasks.format_record`` takes, per the source's ``format``."""
    if spec.format == "pali3":
        return _metadata(raw, required=True)
    return _img2dataset_record(spec, raw)


def members(raw: dict) -> str:
    """The member extensions of a sample, for messages: ``.jpg, .json, .txt``."""
    return ", ".join(f".{k}" for k in sorted(raw) if not k.startswith("__")) or "none"


def _img2dataset_record(spec: SourceConfig, raw: dict) -> dict:
    fields = spec.fields or FieldMapping()
    needs_json = JSON_KEY in fields.text + (fields.language or "")
    metadata = _metadata(raw, required=True) if needs_json else {}
    text = _lookup(raw, metadata, fields.text, "fields.text")
    language = fields.language or spec.languages[0]
    if language.startswith(JSON_KEY):
        language = _lookup(raw, metadata, language, "fields.language").strip()
    return {TASKS[spec.task].record_field: {language: text}}


def _lookup(raw: dict, metadata: dict, where: str, option: str) -> str:
    if where.startswith(JSON_KEY):
        key = where.removeprefix(JSON_KEY)
        if key not in metadata:
            found = ", ".join(sorted(metadata)) or "none"
            raise Rejected("missing_field", f"{option}: no {key!r} key in .json (keys: {found})")
        value = metadata[key]
        if not isinstance(value, str):
            raise Rejected("missing_field", f"{option}: .json {key!r} is {value!r}, not text")
        return value
    if where not in raw:
        raise Rejected("missing_field", f"{option}: no .{where} member (members: {members(raw)})")
    try:
        return raw[where].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_text", f".{where} is not UTF-8: {exc}") from None


def _metadata(raw: dict, required: bool) -> dict:
    if "json" not in raw:
        if required:
            raise Rejected("missing_field", f"no .json member (members: {members(raw)})")
        return {}
    try:
        record = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("invalid_json", str(exc)) from None
    if not isinstance(record, dict):
        raise Rejected("invalid_json", f"expected an object, got {type(record).__name__}")
    return record
