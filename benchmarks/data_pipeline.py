"""Data pipeline throughput against plain webdataset decoding, on the same shards in one run.

    .venv/bin/python -m benchmarks.data_pipeline [--samples 1536] [--image-px 384 640] [--out FILE]

(as a module: run as a file, its name would hide the ``data_pipeline`` package it measures.)

The baseline is webdataset's own recipe: ``WebDataset(...).decode("rgb8").to_tuple(...)``,
batched in the workers, with the standard shard splitting. The full path is ``DataPipeline``:
a three-source mixture (each source a third of the shards, each a different task), prompt
formatting, decode and resize to 224 px, tokenisation and fixed-length collation, then the
images normalised to float32 in the main process (on the CPU here). Both run under a DataLoader
with 0, 1 and 2 workers; each cell is the best of ``--repeats`` passes.
Images larger than twice the target size let the full path decode JPEGs at a reduced scale
(``draft``); at 384 px it cannot, and pays for the resize the baseline does not do.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pali3_train.config import config_from_dict
from pali3_train.data_pipeline.loader import DataPipeline
from pali3_train.data_pipeline.shards import expand
from pali3_train.data_pipeline.write_shards import Example, write_source
from pali3_train.tokenizer import train_tokenizer

TASKS = ("caption", "vqa", "ocr")


def _photo_like(rng: np.random.Generator, size: int) -> bytes:
    """Smooth colour fields plus noise: JPEG sizes and decode cost close to real photos."""
    coarse = rng.random((size // 32, size // 32, 3))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _record(i: int) -> dict:
    words = ["red", "green", "blue", "small", "large", "circle", "square", "photo", "of", "a"]
    text = " ".join(words[(i * k) % len(words)] for k in range(1, 9))
    return {"caption": {"en": text}, "vqa": {"en": [[f"what is {i}?", text]]}, "ocr": {"en": text}}


def write_corpus(root: Path, samples: int, image_px: int) -> tuple[list[str], Path]:
    rng = np.random.default_rng(0)
    patterns = []
    per_source = samples // len(TASKS)
    for task in TASKS:
        examples = (
            Example(f"{task}-{i:06d}", _photo_like(rng, image_px), "jpg", _record(i))
            for i in range(per_source)
        )
        manifest = write_source(examples, root / task, task, [task], ["en"], 64)
        patterns.append(str(root / task / manifest.pattern))
    texts = [_record(i)["caption"]["en"] for i in range(50)] + ["Caption in EN:", "Answer in EN:"]
    tokenizer = train_tokenizer(
        texts=texts, vocab_size=200, model_type="bpe", model_path=root / "tok.model"
    )
    return patterns, Path(tokenizer.source)


def _raw_loader(patterns: list[str], workers: int, batch: int):
    urls = [u for p in patterns for u in expand(p)]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker)
        .decode("rgb8")
        .to_tuple("jpg", "json")
        .batched(batch, partial=True)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def _pipeline(patterns: list[str], tokenizer: Path, workers: int, batch: int) -> DataPipeline:
    sources = [{"name": t, "shards": p, "task": t} for t, p in zip(TASKS, patterns)]
    cfg = config_from_dict(
        {
            "model": {"vit": {"image_size_px": 224, "patch_size_px": 14}},
            "data": {
                "tokenizer_path": str(tokenizer),
                "sources": sources,
                "num_workers": workers,
                "max_prompt_tokens": 32,
                "max_target_tokens": 32,
            },
        }
    )
    return DataPipeline(
        cfg.data,
        image_size_px=cfg.model.vit.image_size_px,
        seed=cfg.train.seed,
        batch_size=batch,
        mode="epoch",
    )


def _samples_per_s(make, repeats: int) -> tuple[float, int]:
    best, count = 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(len(b[0]) if isinstance(b, (list, tuple)) else len(b) for b in make())
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def _rows(root: Path, samples: int, image_px: int, batch: int, repeats: int) -> list[str]:
    patterns, tokenizer = write_corpus(root, samples, image_px)
    kib = sum(p.stat().st_size for p in root.rglob("*.tar")) / samples / 1024
    rows = []
    for workers in (0, 1, 2):
        raw, n_raw = _samples_per_s(lambda w=workers: _raw_loader(patterns, w, batch), repeats)
        full, n_full = _samples_per_s(
            lambda w=workers: _pipeline(patterns, tokenizer, w, batch), repeats
        )
        assert n_raw == n_full, (n_raw, n_full)
        ratio = full / raw
        rows.append(
            f"| {image_px} ({kib:.0f} KiB) | {workers} | {raw:.0f} | {full:.0f} | {ratio:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--image-px", type=int, nargs="+", default=[384, 640])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # decode work is in the workers; keep the main process polite

    header = (
        f"{args.samples} JPEG samples per image size in 64-sample shards, batch {args.batch}, "
        f"resized to 224 px; {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"torch {torch.__version__}, best of {args.repeats}"
    )
    rows = [
        "| image px (JPEG) | workers | raw decode samples/s | full pipeline samples/s | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for image_px in args.image_px:
        with tempfile.TemporaryDirectory() as tmp:
            rows += _rows(Path(tmp), args.samples, image_px, args.batch, args.repeats)
    table = "\n".join([header, "", *rows])
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
