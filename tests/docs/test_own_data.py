"""``docs/own_data.md`` as a user would follow it: every shell block of the page, run as written
(in order, in one folder), on tiny stand-ins of the files it names: an img2dataset download, COCO
captions and VQAv2 annotations over a few images, and random HuggingFace SigLIP and T5
checkpoints with their tokenizers. The end products are checked against what the page
promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import T5ForConditionalGeneration

from pali3_train.convert.safetensors_io import read_metadata
from tests.data_pipeline.corpus import example, write_img2dataset
from tests.docs.shell_blocks import ROOT, follow, scratch_checkout
from tests.docs.stand_ins import hf_towers

PAGE = ROOT / "docs" / "own_data.md"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
IMAGES = 12  # COCO images of the stand-in


def _coco(root: Path) -> list[str]:
    for split in ("train2014", "val2014"):
        for i in range(IMAGES if split == "train2014" else 3):
            colour = list(COLOURS)[i % len(COLOURS)]
            path = root / "coco" / split / f"COCO_{split}_{i:012d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), COLOURS[colour]).save(path)
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in range(IMAGES)]
    captions = [
        {"id": 10 * i + j, "image_id": i, "caption": f"a {list(COLOURS)[i % 3]} picture {j}"}
        for i in range(IMAGES)
        for j in range(5)
    ]
    (root / "coco" / "annotations").mkdir()
    (root / "coco" / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"images": images, "annotations": captions})
    )
    questions = [{"question_id": i, "image_id": i, "question": "what colour is it?"}
                 for i in range(IMAGES)]  # fmt: skip
    answers = [{"question_id": i, "image_id": i, "multiple_choice_answer": list(COLOURS)[i % 3],
                "answers": [{"answer": list(COLOURS)[i % 3], "answer_id": k} for k in range(10)]}
               for i in range(IMAGES)]  # fmt: skip
    vqav2 = root / "vqav2"
    vqav2.mkdir()
    (vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(
        json.dumps({"data_subtype": "train2014", "questions": questions})
    )
    (vqav2 / "v2_mscoco_train2014_annotations.json").write_text(
        json.dumps({"annotations": answers})
    )
    return [c["caption"] for c in captions] + ["what colour is it?", *COLOURS]


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> Path:
    """A folder where the page's blocks ran: my_data/ stand-ins in, runs/own/ out."""
    folder = scratch_checkout(tmp_path_factory.mktemp("own_data"))
    data = folder / "my_data"
    laion = [example("laion", i, image_format="WEBP") for i in range(16)]
    write_img2dataset(laion, data / "laion", per_shard=8)
    texts = _coco(data) + [e.record["caption"]["en"] for e in laion]
    hf_towers(data / "hf" / "siglip", data / "hf" / "t5", texts)
    assert follow(PAGE, folder), "no block ran"
    return folder


def test_every_block_of_the_page_runs_and_trains_both_stages(followed):
    own = followed / "runs" / "own"
    assert read_metadata(own / "stage0" / "model.safetensors")["kind"] == "siglip"
    assert read_metadata(own / "stage1" / "model.safetensors")["kind"] == "pali3"
    served = [
        json.loads(line) for line in (own / "stage0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert served[-1]["data/laion/served"] > 0 and served[-1]["data/coco/served"] > 0


def test_the_export_is_a_huggingface_t5_and_the_answers_cover_every_image(followed):
    own = followed / "runs" / "own"
    T5ForConditionalGeneration.from_pretrained(own / "pali3-hf" / "language")
    answers = [json.loads(line) for line in (own / "captions.jsonl").read_text().splitlines()]
    assert sorted(Path(a["image"]).name for a in answers) == [
        f"COCO_val2014_{i:012d}.jpg" for i in range(3)
    ]
    assert all(a["prompt"] == "Caption in EN:" and isinstance(a["answer"], str) for a in answers)
