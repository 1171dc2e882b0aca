"""Turn a source of image-text examples into WebDataset tar shards plus a manifest.

A source is a folder of images with a JSONL of records, COCO captions or VQAv2 annotation files
with their image folder (``converters.py``), or a generator function (``module:function``) that
yields ``Example`` objects. Each sample in a shard is ``<key>.jpg``, ``.png`` or ``.webp`` (the
original encoded bytes, never re-encoded) and ``<key>.json`` (the record: one field per task,
each keyed by language; see ``data_pipeline/tasks.py``). A video sample holds ``<key>.mp4`` or
``.webm`` instead, or its frames (``<key>.frame0000.jpg``, ... and their rate in ``<key>.fps``;
``formats.py``); the manifest records each video's frame count, frame rate and duration.

    python -m pali3_train.data_pipeline.write_shards --images photos/ --records records.jsonl \\
        --out shards/photos --name photos --tasks caption,vqa --languages en,de
    python -m pali3_train.data_pipeline.write_shards --images val2014/ \\
        --coco-captions annotations/captions_val2014.json --out shards/coco_val --name coco_val
    python -m pali3_train.data_pipeline.write_shards --images val2014/ \\
        --vqav2-questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --vqav2-annotations v2_mscoco_val2014_annotations.json \\
        --out shards/vqav2_val --name vqav2_val
    python -m pali3_train.data_pipeline.write_shards --images clips/ --records clips.jsonl \\
        --out shards/clips --name clips --tasks video_caption,video_qa
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import webdataset as wds
from PIL import Image

from pali3_train.cli import command_parser
from pali3_train.data_pipeline import video
from pali3_train.data_pipeline.formats import FPS_MEMBER, FRAME_FORMATS, frame_member
from pali3_train.data_pipeline.manifest import Manifest, ShardInfo, file_sha256

# webdataset splits a member name at its first dot into key and field, so keys must be dot-free.
KEY_PATTERN = re.compile(r"^[\w-]+$")
IMAGE_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
VIDEO_FORMATS = {".mp4": "mp4", ".webm": "webm"}


@dataclass(frozen=True)
class Example:
    key: str
    # An encoded JPEG, PNG or WebP; an encoded mp4 or webm video; or a video's frames in time
    # order, each an encoded JPEG or PNG (then image_format is theirs and fps is needed).
    image: bytes | tuple[bytes, ...]
    image_format: Literal["jpg", "png", "webp", "mp4", "webm"]
    record: dict  # task fields, e.g. {"caption": {"en": "a red square"}}
    fps: float | None = None  # a frame list's frame rate (an encoded video knows its own)


def write_source(
    examples: Iterable[Example],
    out_dir: str | Path,
    name: str,
    tasks: Iterable[str],
    languages: Iterable[str],
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: float = 1e9,
    tokenizer: str | None = None,
) -> Manifest:
    """Write ``examples`` as ``<out_dir>/<name>-NNNNNN.tar`` and ``<out_dir>/manifest.json``.

    An example whose image or video does not decode is left out and counted in the manifest's
    ``skipped``; a malformed or repeated key is an error, because keys are how samples are
    traced (and deduplicated) across a training run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{name}-*.tar"):
        old.unlink()  # a shorter rewrite must not leave stale shards matching the pattern
    shards: list[ShardInfo] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    videos: dict[str, dict] = {}

    def shard_done(path: str) -> None:
        shards.append(
            ShardInfo(Path(path).name, writer.count, Path(path).stat().st_size, file_sha256(path))
        )

    writer = wds.ShardWriter(
        str(out_dir / f"{name}-%06d.tar"),
        maxcount=max_samples_per_shard,
        maxsize=max_bytes_per_shard,
        post=shard_done,
        verbose=0,
        mtime=0,  # a fixed timestamp: the same examples give byte-identical shards
    )
    with writer:
        for example in examples:
            _check_key(example.key, seen)
            problem = _check_media(example, videos)
            if problem:
                skipped[problem] += 1
                print(f"{name}: skipping {example.key}: {problem}", file=sys.stderr)
                continue
            writer.write({"__key__": example.key, **_media(example), "json": example.record})
    last = len(shards) - 1
    manifest = Manifest(
        source=name,
        tasks=tuple(tasks),
        languages=tuple(languages),
        shards=tuple(shards),
        pattern=f"{name}-{{000000..{last:06d}}}.tar" if last > 0 else f"{name}-000000.tar",
        skipped=dict(skipped),
        tokenizer=tokenizer,
        videos=videos,
    )
    manifest.write(out_dir)
    return manifest


def image_path(
    images: Path, name: str, where: str, formats: dict = IMAGE_FORMATS, what: str = "image"
) -> Path:
    """``images / name``, refused (naming ``where``) unless it is a file of ``formats`` (by
    default the images we read; ``what`` the files are, for the message)."""
    path = images / name
    if path.suffix.lower() not in formats:
        *others, last = formats
        allowed = f"{', '.join(others)} and {last}"
        raise ValueError(f"{where}: {path}: only {allowed} {what}s are supported")
    if not path.is_file():
        raise ValueError(f"{where}: {path}: no such {what}")
    return path


def _check_key(key: str, seen: set[str]) -> None:
    if not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r}: use letters, digits, '_' and '-' only")
    if key in seen:
        raise ValueError(f"sample key {key!r} appears twice")
    seen.add(key)


def _check_media(example: Example, videos: dict[str, dict]) -> str | None:
    """The skip reason if ``example``'s media does not decode; a video's frame count, rate
    and duration go into ``videos`` under its key."""
    if isinstance(example.image, bytes) and example.image_format not in video.VIDEO_FIELDS:
        return None if _decodes(example.image) else "corrupt_image"
    if not isinstance(example.image, bytes):
        if example.image_format not in FRAME_FORMATS:  # the reader would reject every one
            raise ValueError(
                f"sample {example.key!r}: image_format: frames must be {', '.join(FRAME_FORMATS)}"
                f" files, got {example.image_format!r}"
            )
        if example.fps is None:
            raise ValueError(f"sample {example.key!r}: a list of frames needs their fps")
        if not _is_rate(example.fps):
            raise ValueError(f"sample {example.key!r}: fps: expected a finite rate > 0, got "
                             f"{example.fps!r}")  # fmt: skip
    try:
        info = video.video_info(example.image, example.fps)
    except video.UndecodableVideo:
        return "corrupt_video"
    videos[example.key] = {"frames": info.frames, "fps": info.fps, "duration_s": info.duration_s}
    return None


def _media(example: Example) -> dict[str, bytes]:
    """The tar members of an example's image or video (``formats.py`` reads them back)."""
    if isinstance(example.image, bytes):
        return {example.image_format: example.image}
    frames = {frame_member(i, example.image_format): f for i, f in enumerate(example.image)}
    return {**frames, FPS_MEMBER: repr(float(example.fps)).encode()}


def _is_rate(fps: object) -> bool:
    """A frame rate: a finite number > 0 (Python's json reads ``Infinity`` and ``NaN``)."""
    return (
        isinstance(fps, (int, float))
        and not isinstance(fps, bool)
        and math.isfinite(fps)
        and fps > 0
    )


def _decodes(image: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(image)) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for bad data
        return False


def examples_from_folder(
    images: str | Path, records: str | Path, language: str = "en"
) -> Iterator[Example]:
    """One example per JSONL line: ``{"image": "<path under images>", "key": optional, ...task
    fields}``; a video is ``"video": "<.mp4/.webm path>"`` or ``"frames": [<.jpg/.png paths in
    time order>], "fps": <their rate>`` instead. Without ``key`` the image, video or first frame
    path (slashes and dots made '_') is the key, so a rewrite of the same folder gives the same
    keys. Task fields are in the record schema, or flat (``record_from_flat_fields``:
    ``"captions": [...]``, ``"question"`` and ``"answers"``), then in ``language``."""
    images, records = Path(images), Path(records)
    with open(records, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{records}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
            media, path, fps = _read_media(images, record, where)
            key = record.pop("key", None) or re.sub(r"[^\w-]", "_", str(path.relative_to(images)))
            record = record_from_flat_fields(record, language, where)
            formats = VIDEO_FORMATS if path.suffix.lower() in VIDEO_FORMATS else IMAGE_FORMATS
            yield Example(key, media, formats[path.suffix.lower()], record, fps)


def _read_media(
    images: Path, record: dict, where: str
) -> tuple[bytes | tuple[bytes, ...], Path, float | None]:
    """Pop a JSONL line's ``image``, ``video`` or ``frames`` (with ``fps``) -> (its bytes, the
    path that names it, the frames' rate)."""
    named = [n for n in ("image", "video", "frames") if n in record]
    if len(named) != 1:
        raise ValueError(
            f'{where}: each line needs an "image" path (or a "video" path, or "frames" and "fps")'
        )
    value = record.pop(named[0])
    if named[0] != "frames":
        if not isinstance(value, str):
            raise ValueError(f"{where}: {named[0]}: expected a path, got {value!r}")
        formats = IMAGE_FORMATS if named[0] == "image" else VIDEO_FORMATS
        path = image_path(images, value, where, formats, named[0])
        return path.read_bytes(), path, None
    fps = record.pop("fps", None)
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{where}: frames: expected a list of image paths, got {value!r}")
    if not _is_rate(fps):
        raise ValueError(
            f"{where}: fps: frames need their frame rate (a finite number > 0), got {fps!r}"
        )
    frame_formats = {k: v for k, v in IMAGE_FORMATS.items() if v in ("jpg", "png")}
    paths = [image_path(images, v, f"{where}: frames", frame_formats, "frame") for v in value]
    if len({IMAGE_FORMATS[p.suffix.lower()] for p in paths}) > 1:
        raise ValueError(f"{where}: frames: mixes JPEG and PNG files; use one format")
    return tuple(p.read_bytes() for p in paths), paths[0], float(fps)


FLAT_TEXT_FIELDS = {"caption": "caption", "captions": "caption", "alt_text": "alt_text",
                    "ocr": "ocr"}  # fmt: skip


def record_from_flat_fields(fields: dict, language: str, where: str) -> dict:
    """A JSONL line's fields in the record schema: a flat text or list of texts is wrapped in
    ``language``; ``question`` with ``answer``/``answers`` becomes one vqa pair; fields already
    keyed by language, and any other field, are kept as they are."""
    record = dict(fields)
    for name, task in FLAT_TEXT_FIELDS.items():
        value = record.get(name)
        if value is None or isinstance(value, dict):
            continue
        del record[name]
        if task in record:
            raise ValueError(f"{where}: {name}: {task} is given twice")
        record[task] = {language: _texts(value, f"{where}: {name}")}
    if "question" in record:
        question = record.pop("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: question: expected non-empty text, got {question!r}")
        named = [n for n in ("answer", "answers") if n in record]
        if len(named) != 1:
            raise ValueError(f'{where}: question: needs one of "answer" or "answers"')
        answer = _texts(record.pop(named[0]), f"{where}: {named[0]}")
        if "vqa" in record:
            raise ValueError(f"{where}: question: vqa is given twice")
        record["vqa"] = {language: [[question.strip(), answer]]}
    return record


def _texts(value: object, where: str) -> str | list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{where}: expected non-empty text or a list of them, got {value!r}")
    return value


def _generator(spec: str) -> Callable[..., Iterable[Example]]:
    module, _, function = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"error: --generator {spec}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.data_pipeline.write_shards", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="JSONL of records (with --images)")
    source.add_argument("--coco-captions", help="COCO captions_*.json (with --images)")
    source.add_argument("--vqav2-questions", help="VQAv2 questions JSON (with --images and "
                        "--vqav2-annotations)")  # fmt: skip
    source.add_argument("--generator", help="module:function yielding Example objects")
    parser.add_argument("--images", help="folder the records' image, video and frame paths "
                        "are relative to")  # fmt: skip
    parser.add_argument("--vqav2-annotations", help="VQAv2 annotations JSON (the answers)")
    parser.add_argument("--vqav2-image-name", help="an image's file name from {image_id}, e.g. "
                        "COCO_val2014_{image_id:012d}.jpg (default: from the questions' "
                        "data_subtype)")  # fmt: skip
    parser.add_argument("--count", type=int, default=1000, help="examples to take from --generator")
    parser.add_argument("--seed", type=int, default=0, help="seed for --generator")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", required=True, help="source name (shard file prefix)")
    parser.add_argument("--tasks", help="comma-separated tasks the records serve (default for "
                        "--coco-captions: caption; for --vqav2-questions: vqa)")  # fmt: skip
    parser.add_argument("--languages", default="en",
                        help="comma-separated codes; the first is flat JSONL fields'")  # fmt: skip
    parser.add_argument("--max-samples-per-shard", type=int, default=10_000,
                        help="a shard closes after this many samples")  # fmt: skip
    parser.add_argument("--max-bytes-per-shard", type=float, default=1e9,
                        help="... or once it holds this many bytes")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)

    from pali3_train.data_pipeline import converters  # here, not at the top: it imports this module

    language = args.languages.split(",")[0]
    needs_images = args.records or args.coco_captions or args.vqav2_questions
    if needs_images and not args.images:
        parser.error("--records, --coco-captions and --vqav2-questions need --images")
    if bool(args.vqav2_questions) != bool(args.vqav2_annotations):
        parser.error("--vqav2-questions and --vqav2-annotations go together")
    tasks = args.tasks or (
        "caption" if args.coco_captions else "vqa" if args.vqav2_questions else ""
    )
    if not tasks:
        parser.error("--tasks is needed with --records and --generator")
    try:
        if args.records:
            examples = examples_from_folder(args.images, args.records, language)
        elif args.coco_captions:
            examples = converters.examples_from_coco_captions(
                args.coco_captions, args.images, language
            )
        elif args.vqav2_questions:
            examples = converters.examples_from_vqav2(
                args.vqav2_questions, args.vqav2_annotations, args.images, language,
                args.vqav2_image_name,
            )  # fmt: skip
        else:
            examples = _generator(args.generator)(count=args.count, seed=args.seed)
        manifest = write_source(
            examples,
            args.out,
            args.name,
            tasks.split(","),
            args.languages.split(","),
            args.max_samples_per_shard,
            args.max_bytes_per_shard,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(
        f"wrote {manifest.samples} samples in {len(manifest.shards)} shard(s) to {args.out} "
        f"(pattern {manifest.pattern}; skipped {manifest.skipped or 'none'})"
    )


if __name__ == "__main__":
    main()
