"""``docs/own_data.md`` as a user would follow it: every shell block of the page, run as written
(in order, in one folder), on tiny stand-ins of the files it names: an img2dataset download, COCO
captions and VQAv2 annotations over a few images, and random HuggingFace SigLIP and T5
checkpoints with their tokenizers. The end products are checked against what the page
promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from transformers import T5ForConditionalGeneration

from pali3_train.config import TextConfig, UL2Config, ViTConfig
from pali3_train.convert.safetensors_io import read_metadata
from pali3_train.tokenizer import train_tokenizer
from tests.data_pipeline.corpus import example, write_img2dataset
from tests.hf_reference import hf_siglip, hf_t5

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "own_data.md"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
IMAGES = 12  # COCO images of the stand-in
VIT = ViTConfig(image_size_px=32, patch_size_px=8, width=48, depth=2, num_heads=4, mlp_dim=96)
TEXT = TextConfig(vocab_size=256, max_len=64, width=40, depth=2, num_heads=5, mlp_dim=80)
UL2 = UL2Config(vocab_size=256, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2,
                num_decoder_layers=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=20)  # fmt: skip


def shell_blocks(page: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)


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


def _towers(root: Path, texts: list[str]) -> None:
    prompts = ["Caption in EN:", "Answer in EN:"]
    for name, model, vocab in (("siglip", hf_siglip(VIT, TEXT), 160), ("t5", hf_t5(UL2), 200)):
        model.save_pretrained(root / "hf" / name)
        train_tokenizer(texts=texts + prompts, vocab_size=vocab, model_type="bpe",
                        model_path=root / "hf" / name / "spiece.model")  # fmt: skip


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> Path:
    """A folder where the page's blocks ran: my_data/ stand-ins in, runs/own/ out."""
    folder = tmp_path_factory.mktemp("own_data")
    data = folder / "my_data"
    laion = [example("laion", i, image_format="WEBP") for i in range(16)]
    write_img2dataset(laion, data / "laion", per_shard=8)
    texts = _coco(data) + [e.record["caption"]["en"] for e in laion]
    _towers(data, texts)
    for shared in ("configs", "launcher", ".venv"):
        (folder / shared).symlink_to(ROOT / shared)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for block in shell_blocks(PAGE):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, f"{block}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
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
