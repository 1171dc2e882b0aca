"""The shard writer: real tars that plain webdataset reads back byte for byte, an honest
manifest, and clear refusals."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from pali3_train.data_pipeline.manifest import Manifest
from pali3_train.data_pipeline.shards import expand
from pali3_train.data_pipeline.write_shards import Example, examples_from_folder, write_source
from tests.data_pipeline.corpus import example


def _read_back(pattern: str) -> list[dict]:
    return list(wds.WebDataset(expand(pattern), shardshuffle=False))


def test_shards_hold_the_examples_unchanged_and_the_manifest_describes_them(tmp_path):
    examples = [example("src", i) for i in range(11)]
    manifest = write_source(examples, tmp_path, "src", ["caption"], ["en", "de"], 4)

    assert [s.samples for s in manifest.shards] == [4, 4, 3]
    assert manifest.pattern == "src-{000000..000002}.tar"
    assert Manifest.read(tmp_path) == manifest
    assert manifest.verify(tmp_path) == []
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s.file for s in manifest.shards]

    samples = _read_back(str(tmp_path / manifest.pattern))
    assert [s["__key__"] for s in samples] == [e.key for e in examples]
    for sample, e in zip(samples, examples):
        assert sample["png"] == e.image  # kept encoded, never re-encoded
        assert json.loads(sample["json"]) == e.record


def test_verify_finds_a_changed_shard(tmp_path):
    manifest = write_source(
        [example("src", i) for i in range(6)], tmp_path, "src", ["ocr"], ["en"], 3
    )
    shard = tmp_path / manifest.shards[1].file
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    assert manifest.verify(tmp_path) == [manifest.shards[1].file]


def test_shards_split_by_bytes_too(tmp_path):
    manifest = write_source(
        [example("big", i, size_px=64) for i in range(6)],
        tmp_path,
        "big",
        ["ocr"],
        ["en"],
        max_samples_per_shard=100,
        max_bytes_per_shard=1,
    )
    assert [s.samples for s in manifest.shards] == [1] * 6


def test_an_undecodable_image_is_left_out_and_counted(tmp_path):
    examples = [example("src", i) for i in range(3)]
    examples[1] = Example("src-broken", b"not an image", "jpg", {})
    manifest = write_source(examples, tmp_path, "src", ["caption"], ["en"])
    assert manifest.samples == 2 and manifest.skipped == {"corrupt_image": 1}


@pytest.mark.parametrize("key,words", [("a.b", "letters, digits"), ("src-00000", "twice")])
def test_bad_or_repeated_keys_are_refused(tmp_path, key, words):
    examples = [example("src", 0), Example(key, example("src", 1).image, "png", {})]
    with pytest.raises(ValueError, match=words):
        write_source(examples, tmp_path, "src", ["caption"], ["en"])


def _folder(tmp_path, lines: list[str]):
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(images / "cats" / "red.jpg")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(images / "blue.png")
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    return images, records


def test_a_folder_with_jsonl_records_becomes_examples(tmp_path):
    images, records = _folder(
        tmp_path,
        [
            '{"image": "cats/red.jpg", "caption": {"en": "a red cat"}}',
            "",
            '{"image": "blue.png", "key": "b1", "vqa": {"en": [["colour?", "blue"]]}}',
        ],
    )
    red, blue = examples_from_folder(images, records)
    assert (red.key, red.image_format, red.record) == (
        "cats_red_jpg",
        "jpg",
        {"caption": {"en": "a red cat"}},
    )
    assert red.image == (images / "cats" / "red.jpg").read_bytes()
    assert (blue.key, blue.image_format) == ("b1", "png")


@pytest.mark.parametrize(
    "line,words",
    [
        ('{"image": "cats/red.jpg", ', "records.jsonl:1: invalid JSON"),
        ('{"caption": {}}', 'records.jsonl:1: each line needs an "image"'),
        ('{"image": "nope.jpg"}', "records.jsonl:1: .*nope.jpg: no such image"),
        ('{"image": "blue.gif"}', "records.jsonl:1: .*only .jpg, .jpeg, .png and .webp"),
    ],
)
def test_bad_records_are_refused_naming_file_and_line(tmp_path, line, words):
    images, records = _folder(tmp_path, [line])
    with pytest.raises(ValueError, match=words):
        list(examples_from_folder(images, records))


def test_the_command_line_writes_shards_from_a_folder(tmp_path):
    images, records = _folder(
        tmp_path,
        ['{"image": "cats/red.jpg", "caption": {"en": "a red cat"}}'] * 1
        + ['{"image": "blue.png", "caption": {"en": "blue"}}'],
    )
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        "-m",
        "pali3_train.data_pipeline.write_shards",
        "--images",
        str(images),
        "--records",
        str(records),
        "--out",
        str(out),
        "--name",
        "pets",
        "--tasks",
        "caption",
        "--languages",
        "en",
        "--max-samples-per-shard",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote 2 samples in 2 shard(s)" in result.stdout
    manifest = Manifest.read(out / "manifest.json")
    assert (manifest.source, manifest.tasks, manifest.samples) == ("pets", ("caption",), 2)
    assert [s["__key__"] for s in _read_back(str(out / manifest.pattern))] == [
        "cats_red_jpg",
        "blue_png",
    ]
    image = Image.open(io.BytesIO(_read_back(str(out / manifest.pattern))[0]["jpg"]))
    assert image.format == "JPEG"
