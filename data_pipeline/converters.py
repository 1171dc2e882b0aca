"""Common annotation files -> ``Example``s for ``write_shards``, every reference kept.

- COCO captions (``annotations/captions_*.json`` + the image folder): one example per image with
  all its captions, ``{"caption": {"en": [five captions]}, "image_id": ...}``.
- VQAv2 (questions JSON + annotations JSON + the COCO image folder): one example per question with
  all ten answers, ``{"vqa": {"en": [[question, [ten answers]]]}, "question_id": ..., ...}``.

(The generic JSONL, ``{"image": path, ...fields}`` per line, is
``write_shards.examples_from_folder``.)

A malformed file is refused before anything is written, with one line naming the file and the
field (``captions_val2014.json: annotations[3].caption: expected non-empty text, got 5``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from pali3_train.data_pipeline.write_shards import IMAGE_FORMATS, Example, image_path

# VQAv2's files name images by id only; the COCO file name of image 391895 in val2014:
VQA_IMAGE_NAME = "COCO_{subtype}_{image_id:012d}.jpg"


def examples_from_coco_captions(
    annotations: str | Path, images: str | Path, language: str = "en"
) -> Iterator[Example]:
    """One example per image of a COCO captions file that has captions (in the file's order),
    keyed by its file name; images without any caption (a test split) are left out."""
    annotations, images = Path(annotations), Path(images)
    data = _load(annotations, ("images", "annotations"))
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{annotations}: annotations[{i}]"
        image_id = _get(ann, "image_id", int, where)
        captions.setdefault(image_id, []).append(_get(ann, "caption", str, where).strip())
    planned = []
    for i, image in enumerate(data["images"]):
        where = f"{annotations}: images[{i}]"
        image_id = _get(image, "id", int, where)
        file_name = _get(image, "file_name", str, where)
        if image_id not in captions:
            continue
        path = image_path(images, file_name, f"{where}.file_name")
        record = {"caption": {language: captions.pop(image_id)}, "image_id": image_id}
        planned.append((_key(file_name), path, record))
    if captions:
        image_id = next(iter(captions))
        raise ValueError(f"{annotations}: annotations: image_id {image_id} is not in images")
    return _examples(planned)


def examples_from_vqav2(
    questions: str | Path,
    annotations: str | Path,
    images: str | Path,
    language: str = "en",
    image_name: str | None = None,
) -> Iterator[Example]:
    """One example per question of a VQAv2 questions file (in its order) with the ten answers of
    the annotations file, keyed ``vqa-<question_id>``. ``image_name`` formats an image's file name
    from ``{image_id}`` (and ``{subtype}``); by default COCO's, for the questions file's
    ``data_subtype`` (``COCO_val2014_000000391895.jpg``)."""
    questions, annotations, images = Path(questions), Path(annotations), Path(images)
    q_data = _load(questions, ("questions",))
    a_data = _load(annotations, ("annotations",))
    answers: dict[int, tuple[list[str], dict]] = {}
    for i, ann in enumerate(a_data["annotations"]):
        where = f"{annotations}: annotations[{i}]"
        question_id = _get(ann, "question_id", int, where)
        listed = _get(ann, "answers", list, where)
        if not listed:
            raise ValueError(f"{where}.answers: expected a non-empty list, got []")
        texts = [_get(a, "answer", str, f"{where}.answers[{j}]") for j, a in enumerate(listed)]
        extra = {k: ann[k] for k in ("answer_type", "question_type") if isinstance(ann.get(k), str)}
        answers[question_id] = (texts, extra)
    if image_name is None:
        subtype = _get(q_data, "data_subtype", str, f"{questions}: (top level)")
        image_name = VQA_IMAGE_NAME.replace("{subtype}", subtype)
    planned = []
    for i, question in enumerate(q_data["questions"]):
        where = f"{questions}: questions[{i}]"
        question_id = _get(question, "question_id", int, where)
        image_id = _get(question, "image_id", int, where)
        text = _get(question, "question", str, where)
        if question_id not in answers:
            raise ValueError(
                f"{where}.question_id: {question_id} has no entry in {annotations}'s annotations"
            )
        texts, extra = answers[question_id]
        path = image_path(images, image_name.format(image_id=image_id), f"{where}.image_id")
        record = {
            "vqa": {language: [[text.strip(), texts]]},
            "question_id": question_id,
            "image_id": image_id,
        } | extra
        planned.append((f"vqa-{question_id}", path, record))
    return _examples(planned)


def _load(path: Path, lists: tuple[str, ...]) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for name in lists:
        if not isinstance(data.get(name), list):
            raise ValueError(f"{path}: {name}: expected a list (is this the right file?)")
    return data


_KINDS = {int: "an integer", str: "non-empty text", list: "a list"}


def _get(item: object, name: str, kind: type, where: str):
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {item!r}")
    value = item.get(name)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok or (kind is str and not value.strip()):
        got = "nothing" if name not in item else repr(value)
        raise ValueError(f"{where}.{name}: expected {_KINDS[kind]}, got {got}")
    return value


def _key(file_name: str) -> str:
    return re.sub(r"[^\w-]", "_", str(Path(file_name).with_suffix("")))


def _examples(planned: list[tuple[str, Path, dict]]) -> Iterator[Example]:
    """Images read one at a time, as the writer asks for them."""
    for key, path, record in planned:
        yield Example(key, path.read_bytes(), IMAGE_FORMATS[path.suffix.lower()], record)
