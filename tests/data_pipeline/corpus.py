"""A small four-source corpus of real shards for the data pipeline tests.

Shard counts (5, 5, 4, 4 with uneven last shards) are chosen not to divide the 2x2 and 3x1
rank x worker layouts the tests use, so that exactly-once is tested where it is hard. Source
``delta`` is laid out as img2dataset writes (WebP image, ``.txt`` caption, ``.json`` metadata)
and read with ``format: img2dataset``, so every exactly-once, resume and damage test covers both
shard formats.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from pali3_train.config import Config, config_from_dict
from pali3_train.data_pipeline.loader import DataPipeline
from pali3_train.data_pipeline.mixture import Mode
from pali3_train.data_pipeline.write_shards import Example, write_source
from pali3_train.tokenizer import train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "grey": (128,) * 3}
# name -> (samples, samples per shard)
SOURCES = {"alpha": (23, 5), "beta": (17, 4), "gamma": (11, 3), "delta": (13, 4)}
TASKS = {"alpha": "caption", "beta": "vqa", "gamma": "split_caption", "delta": "caption"}
FORMATS = {"delta": "img2dataset"}  # the others: pali3


def example(source: str, index: int, size_px: int = 12, image_format: str = "PNG") -> Example:
    colour = list(COLOURS)[index % len(COLOURS)]
    image = Image.new("RGB", (size_px, size_px), COLOURS[colour])
    # A white mark placed by the index: images of one colour differ, and resizing shows in them.
    image.putpixel((index % size_px, index // size_px % size_px), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(
        buffer, format=image_format, **({"lossless": True} if image_format == "WEBP" else {})
    )
    record = {
        "caption": {"en": f"a {colour} square number {index}", "de": f"ein Quadrat {index}"},
        "alt_text": {"en": f"the {colour} square {index} of {source}"},
        "vqa": {"en": [["what colour is it?", colour], ["which number?", str(index)]]},
    }
    return Example(f"{source}-{index:05d}", buffer.getvalue(), image_format.lower(), record)


def img2dataset_sample(e: Example) -> dict:
    """``e`` as img2dataset stores it: the image, its caption as ``.txt``, and metadata in which
    the caption appears again among keys the pipeline must ignore."""
    caption = e.record["caption"]["en"]
    metadata = {"url": f"https://example.com/{e.key}.webp", "caption": caption, "key": e.key,
                "status": "success", "width": 12, "height": 12}  # fmt: skip
    return {"__key__": e.key, e.image_format: e.image, "txt": caption.encode(),
            "json": json.dumps(metadata).encode()}  # fmt: skip


def write_img2dataset(examples: list[Example], folder: Path, per_shard: int) -> str:
    """Shards laid out as img2dataset writes them (``00000.tar``, ...); returns their pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    count = -(-len(examples) // per_shard)
    for n in range(count):
        with wds.TarWriter(str(folder / f"{n:05d}.tar")) as tar:
            for e in examples[n * per_shard : (n + 1) * per_shard]:
                tar.write(img2dataset_sample(e))
    return f"{{00000..{count - 1:05d}}}.tar"


def cut_before(path: Path, key: str) -> None:
    """Cut a shard at the header of ``key``'s first member, as a broken download would: tar
    readers see a clean end there unless they check for the end-of-archive blocks."""
    with tarfile.open(path) as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith(f"{key}."))
    path.write_bytes(path.read_bytes()[:cut])


def flaky_pipe(tmp_path: Path, shard: str, failures: int, cut: int) -> str:
    """A ``pipe:`` URL whose first ``failures`` runs emit the shard's first ``cut`` bytes and
    exit 1 (a connection dropped mid-download); later runs emit all of it."""
    counter = tmp_path / "runs"
    script = tmp_path / "flaky.sh"
    script.write_text(
        f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n"
        f'if [ "$n" -lt {failures} ]; then head -c {cut} {shard}; sleep 0.2; exit 1; fi\n'
        f"cat {shard}\n"
    )
    return f"pipe:sh {script}"


@dataclass(frozen=True)
class Corpus:
    root: Path
    tokenizer: Path
    patterns: dict[str, str]  # source -> its shards' brace pattern under root/<source>

    def keys(self) -> set[str]:
        return {f"{name}-{i:05d}" for name, (count, _) in SOURCES.items() for i in range(count)}

    def sources(self, **weights: float) -> list[dict]:
        return [
            {
                "name": name,
                "shards": str(self.root / name / pattern),
                "task": TASKS[name],
                "weight": weights.get(name, 1.0),
                "languages": ["en", "de"],
                "format": FORMATS.get(name, "pali3"),
            }
            for name, pattern in self.patterns.items()
        ]

    def config(self, sources: list[dict] | None = None, seed: int = 7, **data: object) -> Config:
        return config_from_dict(
            {
                "model": {"vit": {"image_size_px": 16, "patch_size_px": 8}},
                "data": {
                    "tokenizer_path": str(self.tokenizer),
                    "sources": self.sources() if sources is None else sources,
                    "max_prompt_tokens": 16,
                    "max_target_tokens": 12,
                    **data,
                },
                "train": {"seed": seed},
            }
        )


def pipeline(
    cfg: Config,
    dp_rank: int = 0,
    dp_size: int = 1,
    batch_size: int = 4,
    mode: Mode = "train",
    **options: object,
) -> DataPipeline:
    """The pipeline a run of ``cfg`` builds for one data-parallel rank, so tests name only the
    share and batch they read; ``options`` (device, image_dtype) go to ``DataPipeline``."""
    return DataPipeline(
        cfg.data,
        image_size_px=cfg.model.vit.image_size_px,
        seed=cfg.train.seed,
        batch_size=batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        mode=mode,
        **options,
    )


def write_corpus(root: Path) -> Corpus:
    texts = []
    patterns = {}
    for name, (count, per_shard) in SOURCES.items():
        if FORMATS.get(name) == "img2dataset":
            examples = [example(name, i, image_format="WEBP") for i in range(count)]
            patterns[name] = write_img2dataset(examples, root / name, per_shard)
        else:
            examples = [example(name, i) for i in range(count)]
            manifest = write_source(
                examples, root / name, name, [TASKS[name]], ["en", "de"], per_shard
            )
            patterns[name] = manifest.pattern
        for e in examples:
            texts += [*e.record["caption"].values(), *e.record["alt_text"].values()]
            texts += [text for pair in e.record["vqa"]["en"] for text in pair]
    texts += [f"{task} in {lang}:" for task in ("Caption", "Answer") for lang in ("EN", "DE")]
    texts += [f"Generate the alt_text in {lang} at 0:" for lang in ("EN", "DE")]
    tokenizer = train_tokenizer(
        texts=texts, vocab_size=200, model_type="bpe", model_path=root / "tok.model"
    )
    return Corpus(root, Path(tokenizer.source), patterns)
