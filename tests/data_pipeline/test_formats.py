"""Shard formats: an img2dataset sample (image + ``.txt`` + ``.json`` metadata) becomes the
record its task reads, through the source's field mapping; the pali3 format is the ``.json``
record itself. Checked on hand-built samples against the records they should give."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pali3_train.config import ConfigError, config_from_dict
from pali3_train.config.schema import FieldMapping, SourceConfig
from pali3_train.data_pipeline.formats import Rejected, prepare_sample, read_record
from pali3_train.data_pipeline.transforms import decode_image
from pali3_train.data_pipeline.video import encode_video


def _source(**fields) -> SourceConfig:
    options = {"name": "laion", "shards": "x.tar", "task": "caption", "format": "img2dataset"}
    return SourceConfig(**{**options, **fields})


def _sample(**members) -> dict:
    metadata = {"url": "https://example.com/1.jpg", "caption": "from the json", "lang": "de"}
    raw = {"__key__": "000001", "txt": b"from the txt", "json": json.dumps(metadata).encode()}
    return {**raw, **members}


@pytest.mark.parametrize(
    "fields,task,record",
    [
        (None, "caption", {"caption": {"en": "from the txt"}}),
        (FieldMapping(text="json:caption"), "caption", {"caption": {"en": "from the json"}}),
        (FieldMapping(language="json:lang"), "alt_text", {"alt_text": {"de": "from the txt"}}),
        (FieldMapping(language="fr"), "ocr", {"ocr": {"fr": "from the txt"}}),
    ],
)
def test_img2dataset_samples_map_into_the_tasks_field(fields, task, record):
    spec = _source(fields=fields, task=task, languages=("en", "de", "fr"))
    assert read_record(spec, _sample()) == record


def test_a_pali3_sample_is_its_json_record():
    record = {"caption": {"en": "a dog"}, "vqa": {"en": [["what?", "dog"]]}}
    spec = SourceConfig(name="ours", shards="x.tar", task="caption")
    assert read_record(spec, {"json": json.dumps(record).encode()}) == record


@pytest.mark.parametrize(
    "fields,members,reason,words",
    [
        (
            None,
            {"txt": None},
            "missing_field",
            "fields.text: no .txt member (members: .jpg, .json)",
        ),
        (FieldMapping(text="json:text"), {}, "missing_field", "no 'text' key in .json (keys: "),
        (FieldMapping(text="json:caption"), {"json": b"{"}, "invalid_json", ""),
        (FieldMapping(text="json:url"), {"json": b'{"url": 7}'}, "missing_field", "is 7, not text"),
        (None, {"txt": b"\xff\xfe"}, "invalid_text", ".txt is not UTF-8"),
    ],
)
def test_what_a_sample_lacks_is_named(fields, members, reason, words):
    raw = {k: v for k, v in _sample(jpg=b"", **members).items() if v is not None}
    with pytest.raises(Rejected) as caught:
        read_record(_source(fields=fields), raw)
    assert caught.value.reason == reason and words in caught.value.detail


def test_a_plain_caption_read_as_pali3_says_which_format_reads_it():
    spec = SourceConfig(name="ours", shards="x.tar", task="caption")
    with pytest.raises(Rejected, match="'caption' is a str, not a .* format: img2dataset"):
        prepare_sample(spec, _sample(jpg=b""), np.random.default_rng(0), 16)


def test_webp_images_decode_to_their_pixels():
    pixels = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="WEBP", lossless=True)
    sample = prepare_sample(
        _source(), _sample(webp=buffer.getvalue()), np.random.default_rng(0), 16
    )
    assert torch.equal(sample.image, torch.from_numpy(pixels).permute(2, 0, 1))
    assert torch.equal(decode_image(buffer.getvalue(), 16), sample.image)
    assert (sample.prompt, sample.target) == ("Caption in EN:", "from the txt")


def test_a_video2dataset_sample_is_a_captioned_clip():
    """video2dataset's layout (.mp4, .txt caption, .json metadata) read with format: img2dataset;
    in a mixture with video an image sample is frame 0 of a masked clip."""
    frames = np.repeat(np.array([60, 120, 180], np.uint8), 16 * 16 * 3).reshape(3, 16, 16, 3)
    spec = _source(task="video_caption", frame_stride_frames=1)
    raw = _sample(mp4=encode_video(frames, 10.0))
    sample = prepare_sample(spec, raw, np.random.default_rng(0), 16, max_frames=4)
    assert (sample.prompt, sample.target) == ("Caption the video in EN:", "from the txt")
    assert sample.frame_mask.tolist() == [True, True, True, False]
    assert (sample.image[:3].float().mean((1, 2, 3)) - torch.tensor([60, 120, 180])).abs().max() < 3

    still = prepare_sample(_source(), _sample(webp=_webp()), np.random.default_rng(0), 16, 4)
    assert still.frame_mask.tolist() == [True, False, False, False] and not still.image[1:].any()


def _webp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "source,field,words",
    [
        ({"fields": {"text": "txt"}}, "fields", "only with format: img2dataset"),
        ({"format": "img2dataset", "task": "vqa"}, "task", "vqa needs question/answer records"),
        (
            {"format": "img2dataset", "task": "video_qa", "frame_stride_s": 1.0},
            "task",
            "video_qa needs question/answer records",
        ),
        (
            {"format": "img2dataset", "fields": {"language": "de"}},
            "fields.language",
            "'de' is not among languages ['en']",
        ),  # fmt: skip
        ({"format": "img2dataset", "fields": {"text": "json:"}}, "fields.text", "names nothing"),
        ({"format": "webdataset"}, "format", "webdataset"),
    ],
)
def test_a_bad_format_or_mapping_is_refused_naming_the_field(source, field, words):
    entry = {"name": "laion", "shards": "x.tar", "task": "caption", **source}
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"data": {"sources": [entry]}}, source="mix.yaml")
    assert f"data.sources[0].{field}" in str(caught.value) and words in str(caught.value)
