"""Annotation files -> shards -> the real pipeline: tiny hand-made COCO captions, VQAv2 and flat
JSONL files through ``python -m pali3_train.data_pipeline.write_shards`` (its ``main``), read back
in epoch mode: every record once, every reference kept, the target one of them; a malformed file
refused in one line naming the file and the field, before any shard is written."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from pali3_train.data_pipeline.manifest import Manifest
from pali3_train.data_pipeline.write_shards import main
from pali3_train.tokenizer import Tokenizer
from tests.data_pipeline.corpus import pipeline

COCO_CAPTIONS = {
    1: ["A dog on a sofa.", "a brown dog", "A dog resting", "dog lying on a couch", "a pet"],
    2: ["Two cats.", "cats playing"],
}
QUESTIONS = [(10, 1, "What animal is this?"), (11, 1, "Is it asleep?"), (20, 2, "How many?")]
ANSWERS = {
    10: ["dog"] * 7 + ["puppy", "dog ", "brown dog"],
    11: ["no"] * 6 + ["yes"] * 4,
    20: ["2"] * 8 + ["two", "3"],
}


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).save(path)  # JPEG or PNG by the suffix


def _coco(root: Path) -> tuple[Path, Path]:
    images = root / "val2014"
    # image 3 has no caption (and is a PNG)
    files = {i: f"COCO_val2014_{i:012d}.{'png' if i == 3 else 'jpg'}" for i in (1, 2, 3)}
    for image_id, name in files.items():
        _image(images / name, (40 * image_id, 90, 200))
    annotations = [
        {"id": 100 * image_id + j, "image_id": image_id, "caption": caption}
        for j in range(5)
        for image_id, captions in COCO_CAPTIONS.items()
        if j < len(captions)
        for caption in [captions[j]]
    ]  # interleaved across images, as in the real files
    data = {
        "info": {},
        "images": [{"id": i, "file_name": n, "width": 10, "height": 8} for i, n in files.items()],
        "annotations": annotations,
    }
    (root / "annotations").mkdir()
    path = root / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path, images


def _vqav2(root: Path) -> tuple[Path, Path, Path]:
    images = root / "val2014"
    for image_id in (1, 2):
        _image(images / f"COCO_val2014_{image_id:012d}.jpg", (200, 40 * image_id, 90))
    questions = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({
        "data_subtype": "val2014",
        "questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t in QUESTIONS],
    }))  # fmt: skip
    annotations = root / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": i, "answer_type": "other", "multiple_choice_answer": "x",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(ANSWERS[q])]}
        for q, i, _ in QUESTIONS
    ]}))  # fmt: skip
    return questions, annotations, images


def _read_epoch(corpus, out: Path, task: str, batch_size: int = 2) -> dict:
    """key -> (references, target tokens, the references' tokens), one pass in file order."""
    manifest = Manifest.read(out)
    source = {"name": manifest.source, "shards": str(out / manifest.pattern), "task": task}
    cfg = corpus.config([source], num_workers=0)
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    found = {}
    for batch in pipeline(cfg, batch_size=batch_size, mode="epoch"):
        for key, refs, target in zip(batch.keys, batch.references, batch.target):
            assert key not in found, f"{key} served twice"
            tokens, _ = tokenizer.batch_encode(list(refs), batch.target.shape[1])
            found[key] = (refs, target, tokens)
    return found


def _assert_target_is_a_reference(read: dict) -> None:
    for _, target, tokens in read.values():
        assert any(torch.equal(target, row) for row in tokens)


def test_coco_captions_become_one_record_per_image_with_all_its_captions(corpus, tmp_path):
    annotations, images = _coco(tmp_path)
    out = tmp_path / "shards"
    main(["--coco-captions", str(annotations), "--images", str(images), "--out", str(out),
          "--name", "coco_val", "--max-samples-per-shard", "1"])  # fmt: skip
    manifest = Manifest.read(out)
    assert manifest.tasks == ("caption",) and manifest.samples == 2  # image 3 has no caption

    read = _read_epoch(corpus, out, "caption")
    expected = {f"COCO_val2014_{i:012d}": tuple(c.strip() for c in caps)
                for i, caps in COCO_CAPTIONS.items()}  # fmt: skip
    assert {key: refs for key, (refs, _, _) in read.items()} == expected
    _assert_target_is_a_reference(read)


def test_vqav2_becomes_one_record_per_question_with_its_ten_answers(corpus, tmp_path):
    questions, annotations, images = _vqav2(tmp_path)
    out = tmp_path / "shards"
    main(["--vqav2-questions", str(questions), "--vqav2-annotations", str(annotations),
          "--images", str(images), "--out", str(out), "--name", "vqav2_val"])  # fmt: skip
    assert Manifest.read(out).tasks == ("vqa",)

    read = _read_epoch(corpus, out, "vqa")
    expected = {f"vqa-{q}": tuple(a.strip() for a in ANSWERS[q]) for q, _, _ in QUESTIONS}
    assert {key: refs for key, (refs, _, _) in read.items()} == expected
    _assert_target_is_a_reference(read)


def test_flat_jsonl_fields_keep_every_reference(corpus, tmp_path):
    _image(tmp_path / "img" / "a.jpg", (10, 20, 30))
    _image(tmp_path / "img" / "b.png", (30, 20, 10))
    records = tmp_path / "records.jsonl"
    records.write_text(
        json.dumps({"image": "a.jpg", "captions": ["a dark square", "a square"], "id": 7}) + "\n"
        + json.dumps({"image": "b.png", "caption": "a brown square", "question": "what?",
                      "answers": ["square", "box"]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "shards"
    main(["--records", str(records), "--images", str(tmp_path / "img"), "--out", str(out),
          "--name", "mine", "--tasks", "caption,vqa"])  # fmt: skip
    read = _read_epoch(corpus, out, "caption")
    assert {key: refs for key, (refs, _, _) in read.items()} == {
        "a_jpg": ("a dark square", "a square"),
        "b_png": (),  # a single caption: the target is the one reference
    }
    assert {key: refs for key, (refs, _, _) in _read_epoch(corpus, out, "vqa").items()} == {
        "b_png": ("square", "box")
    }


def test_the_drawn_references_resume_exactly(corpus, tmp_path):
    annotations, images = _coco(tmp_path)
    out = tmp_path / "shards"
    main(["--coco-captions", str(annotations), "--images", str(images), "--out", str(out),
          "--name", "coco"])  # fmt: skip
    manifest = Manifest.read(out)
    source = {"name": "coco", "shards": str(out / manifest.pattern), "task": "caption"}
    cfg = corpus.config([source], num_workers=0)
    reference = [b.target for b in islice(pipeline(cfg, batch_size=1), 12)]
    assert len({tuple(t.flatten().tolist()) for t in reference}) > 2  # several captions were drawn

    first = pipeline(cfg, batch_size=1)
    seen = [b.target for b in islice(first, 5)]
    resumed = pipeline(cfg, batch_size=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = [b.target for b in islice(resumed, 7)]
    assert all(torch.equal(a, b) for a, b in zip(seen + after, reference))


def _break_coco(tmp_path, change) -> list[str]:
    annotations, images = _coco(tmp_path)
    data = json.loads(annotations.read_text())
    change(data)
    annotations.write_text(json.dumps(data))
    return ["--coco-captions", str(annotations), "--images", str(images)]


def _break_vqa(tmp_path, which, change) -> list[str]:
    questions, annotations, images = _vqav2(tmp_path)
    path = {"questions": questions, "annotations": annotations}[which]
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return ["--vqav2-questions", str(questions), "--vqav2-annotations", str(annotations),
            "--images", str(images)]  # fmt: skip


def _set(path: list, value):
    def change(data):
        for step in path[:-1]:
            data = data[step]
        if value is KeyError:
            del data[path[-1]]
        else:
            data[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda t: _break_coco(t, _set(["annotations", 1, "caption"], 5)),
         "captions_val2014.json: annotations[1].caption: expected non-empty text, got 5"),
        (lambda t: _break_coco(t, _set(["annotations", 0, "image_id"], KeyError)),
         "captions_val2014.json: annotations[0].image_id: expected an integer, got nothing"),
        (lambda t: _break_coco(t, _set(["images", 0, "file_name"], "missing.jpg")),
         "captions_val2014.json: images[0].file_name: "),
        (lambda t: _break_coco(t, _set(["annotations"], {})),
         "captions_val2014.json: annotations: expected a list"),
        (lambda t: _break_vqa(t, "annotations", _set(["annotations", 2, "answers", 4], {"a": 1})),
         "annotations.json: annotations[2].answers[4].answer: expected non-empty text, got "
         "nothing"),
        (lambda t: _break_vqa(t, "questions", _set(["questions", 1, "question_id"], 99)),
         "questions.json: questions[1].question_id: 99 has no entry in "),
        (lambda t: _break_vqa(t, "questions", _set(["data_subtype"], KeyError)),
         "questions.json: (top level).data_subtype: expected non-empty text, got nothing"),
    ],
)  # fmt: skip
def test_a_malformed_annotation_file_is_named_in_one_line(tmp_path, make, words):
    out = tmp_path / "shards"
    with pytest.raises(SystemExit) as exc:
        main([*make(tmp_path), "--out", str(out), "--name", "broken"])
    message = str(exc.value)
    assert message.startswith("error: ") and "\n" not in message
    assert words in message
    assert not list(out.glob("*.tar"))  # refused before writing


def test_invalid_json_names_the_file(tmp_path):
    annotations, images = _coco(tmp_path)
    annotations.write_text('{"images": [')
    with pytest.raises(SystemExit, match=r"captions_val2014.json: invalid JSON"):
        main(["--coco-captions", str(annotations), "--images", str(images), "--out",
              str(tmp_path / "out"), "--name", "x"])  # fmt: skip


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"captions": []}, "records.jsonl:1: captions: expected non-empty text or a list"),
        ({"caption": "a", "captions": ["b"]}, "records.jsonl:1: captions: caption is given twice"),
        ({"question": "what?"}, 'records.jsonl:1: question: needs one of "answer" or "answers"'),
        ({"question": "what?", "answers": [3]}, "records.jsonl:1: answers: expected non-empty"),
    ],
)
def test_bad_flat_fields_name_the_line_and_field(tmp_path, fields, words):
    _image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "records.jsonl").write_text(json.dumps({"image": "a.png", **fields}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["--records", str(tmp_path / "records.jsonl"), "--images", str(tmp_path),
              "--out", str(tmp_path / "out"), "--name", "x", "--tasks", "caption"])  # fmt: skip
    assert words in str(exc.value) and "\n" not in str(exc.value)
