"""Shard layouts: how one sample's tar members become a training sample.

- ``pali3`` (what ``write_shards`` writes): a ``.json`` member that is the record itself, one
  field per task keyed by language (``tasks.py``).
- ``img2dataset``: what img2dataset writes, and so what LAION, DataComp and CC12M downloads look
  like: the image, the caption as ``.txt`` and a ``.json`` of metadata (url, size, status, ...).
  The source's ``fields`` say where the text is (a member, or a key of the JSON) and its
  language (fixed, or a key); everything else in the sample is ignored. The text becomes the
  one field the source's task reads, so such a source trains stage 0 and captioning as is.

The media. An image task's sample holds one image (``.jpg``, ``.png``, ``.webp``). A video task's
holds the encoded video (``.mp4``, ``.webm``, as video2dataset writes it too) or its frames, one
member each in time order (``.frame0000.jpg``, ``.frame0001.jpg``, ...; PNG alike) with their
frame rate as text in ``.fps``; it becomes a clip of ``max_frames`` (``video.py``). In a
mixture with any video source every sample is a clip, an image being a one-frame clip.

A sample that cannot be used raises ``Rejected`` with the reason it is counted under
(``health.SKIP_REASONS``) and what was found instead, so that a whole source of them can be
refused with a useful line before training.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import torch

from pali3_train.config.schema import VIDEO_TASKS, FieldMapping, SourceConfig
from pali3_train.data_pipeline import video
from pali3_train.data_pipeline.tasks import TASKS, MissingField, format_record
from pali3_train.data_pipeline.transforms import IMAGE_FIELDS, Sample, decode_image

JSON_KEY = "json:"
FRAME_FORMATS = ("jpg", "jpeg", "png")  # what a frame list's frames may be (``frame_member``)
FRAME_MEMBER = re.compile(rf"^frame(\d+)\.({'|'.join(FRAME_FORMATS)})$")
FPS_MEMBER = "fps"


class Rejected(ValueError):
    """One sample is unusable: ``reason`` is its skip counter, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def prepare_sample(
    spec: SourceConfig,
    raw: dict,
    rng: np.random.Generator,
    image_size_px: int,
    max_frames: int | None = None,
    centred: bool = False,
) -> Sample:
    """A raw webdataset sample -> a decoded training sample of source ``spec``, or ``Rejected``.
    ``rng`` draws the language and reference, then where a video's clip starts, so it must be
    the worker's resumable generator. ``max_frames``: every sample a clip of that many frames
    (a mixture with video sources), or None: images (an image-only mixture). ``centred``:
    clips are centred in their videos (evaluation) instead of drawn."""
    record = read_record(spec, raw)
    try:
        formatted = format_record(spec.task, record, spec.languages, rng, spec.prompt)
    except MissingField as exc:
        raise Rejected("missing_field", exc.args[0]) from None
    mask = None
    if spec.task in VIDEO_TASKS:
        assert max_frames is not None, "a mixture with a video source reads clips"
        image, mask = _clip(spec, raw, None if centred else rng, image_size_px, max_frames)
    else:
        image = _image(raw, image_size_px)
        if max_frames is not None:
            image, mask = video.pad_clip([image], max_frames)
    return Sample(raw.get("__key__", "?"), spec.name, image, formatted.prompt, formatted.target,
                  raw.get("__epoch__", 0), formatted.references, mask)  # fmt: skip


def _image(raw: dict, image_size_px: int) -> torch.Tensor:
    image_field = next((f for f in IMAGE_FIELDS if f in raw), None)
    if image_field is None:
        extensions = "/".join(f".{f}" for f in IMAGE_FIELDS)
        raise Rejected("missing_field", f"no {extensions} member (members: {members(raw)})")
    try:
        return decode_image(raw[image_field], image_size_px)
    except Exception as exc:  # PIL raises many types for bad data
        raise Rejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def _clip(
    spec: SourceConfig,
    raw: dict,
    rng: np.random.Generator | None,
    image_size_px: int,
    max_frames: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    stride = video.FrameStride(spec.frame_stride_s, spec.frame_stride_frames)
    encoded, fps = video_members(raw)
    try:
        return video.sample_clip(encoded, image_size_px, max_frames, stride, rng, fps)
    except video.UndecodableVideo as exc:
        raise Rejected("corrupt_video", str(exc)) from None


def video_members(raw: dict) -> tuple[video.Encoded, float | None]:
    """A video sample's media: (the encoded video, None) or (its frames in time order, their
    frame rate from ``.fps`` if present)."""
    field = next((f for f in video.VIDEO_FIELDS if f in raw), None)
    if field is not None:
        return raw[field], None
    numbered = sorted((int(m[1]), k) for k in raw if (m := FRAME_MEMBER.match(k)))
    if not numbered:
        extensions = "/".join(f".{f}" for f in video.VIDEO_FIELDS)
        raise Rejected(
            "missing_field",
            f"no {extensions} or .frame0000.jpg member (members: {members(raw)})",
        )
    if FPS_MEMBER not in raw:
        return [raw[k] for _, k in numbered], None
    try:
        fps = float(raw[FPS_MEMBER].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        fps = 0.0
    if not (math.isfinite(fps) and fps > 0):  # nan and inf parse, and make no clip
        raise Rejected("corrupt_video", f".fps is {raw[FPS_MEMBER][:20]!r}, not a frame rate")
    return [raw[k] for _, k in numbered], fps


def frame_member(index: int, image_format: str) -> str:
    """The member name of a frame list's frame ``index`` (``frame0007.jpg``)."""
    return f"frame{index:04d}.{image_format}"


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
