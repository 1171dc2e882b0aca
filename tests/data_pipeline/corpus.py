"""A small five-source corpus of real shards for the data pipeline tests.

Shard counts (5, 5, 4, 3, 4 with uneven last shards) are chosen not to divide the 2x2 and 3x1
rank x worker layouts the tests use, so that exactly-once is tested where it is hard. Source
``delta`` is laid out as img2dataset writes (WebP image, ``.txt`` caption, ``.json`` metadata)
and read with ``format: img2dataset``, so every exactly-once, resume and damage test covers both
shard formats. Source ``epsilon`` is video (``video_caption``): tiny clips of 2 to 10 frames,
mp4 and JPEG frame lists in turn, so the same tests cover video sources and the batches of a
mixture with video (clips of ``max_frames`` = 4, images as one-frame clips). Read every 2nd
frame, two of them (9 and 10 frames, one of each kind) leave 3 and 4 training starts, so a
clip drawn from anything but the worker's checkpointed generator shows in the frames served.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pali3_train.config import Config, config_from_dict
from pali3_train.data_pipeline.loader import DataPipeline
from pali3_train.data_pipeline.mixture import Mode
from pali3_train.data_pipeline.video import encode_video
from pali3_train.data_pipeline.write_shards import Example, write_source
from pali3_train.tokenizer import train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "grey": (128,) * 3}
# name -> (samples, samples per shard)
SOURCES = {"alpha": (23, 5), "beta": (17, 4), "gamma": (11, 3), "epsilon": (7, 3),
           "delta": (13, 4)}  # fmt: skip
TASKS = {"alpha": "caption", "beta": "vqa", "gamma": "split_caption", "epsilon": "video_caption",
         "delta": "caption"}  # fmt: skip
FORMATS = {"delta": "img2dataset"}  # the others: pali3
VIDEO = {"epsilon": {"frame_stride_frames": 2}}  # video sources and their options
VIDEO_FPS = 5.0
MAX_FRAMES = 4
# epsilon video i's frame count: every frame count a 4-frame clip can take, plus two with room
# to move (9 frames at stride 2: slack 2; 10: slack 3)
FRAME_COUNTS = (2, 3, 4, 5, 6, 9, 10)


def example(source: str, index: int, size_px: int = 12, image_format: str = "PNG") -> Example:
    colour = list(COLOURS)[index % len(COLOURS)]
    image = Image.new("RGB", (size_px, size_px), COLOURS[colour])
    # A white mark placed by the index: images of one colour differ, and resizing shows in them.
    image.putpixel((index % size_px, index // size_px % size_px), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(
        buffer, format=image_format, **({"lossless": True} if image_format == "WEBP" else {})
    )
    return Example(
        f"{source}-{index:05d}", buffer.getvalue(), image_format.lower(), _record(source, index)
    )


def _record(source: str, index: int) -> dict:
    colour = list(COLOURS)[index % len(COLOURS)]
    return {
        "caption": {"en": f"a {colour} square number {index}", "de": f"ein Quadrat {index}"},
        "alt_text": {"en": f"the {colour} square {index} of {source}"},
        "vqa": {"en": [["what colour is it?", colour], ["which number?", str(index)]]},
    }


def video_frames(index: int, size_px: int = 16) -> np.ndarray:
    """uint8 [T, S, S, 3], T = ``FRAME_COUNTS[index % 7]``: video ``index``'s colour, each frame
    a step brighter (so frames tell apart after H.264/JPEG) and a white square moving right
    (back at the left edge from frame 6)."""
    colour = np.array(COLOURS[list(COLOURS)[index % len(COLOURS)]], dtype=np.int64)
    count = FRAME_COUNTS[index % len(FRAME_COUNTS)]
    frames = np.zeros((count, size_px, size_px, 3), dtype=np.int64)
    for t in range(count):
        frames[t] = np.clip(colour // 2 + 16 * t, 0, 255)
        left = 2 * (t % 6)
        frames[t, 4:8, left : left + 4] = 255
    return frames.astype(np.uint8)


def video_example(source: str, index: int) -> Example:
    """Video ``index``: an mp4 for even indices, JPEG frames at ``VIDEO_FPS`` for odd ones."""
    frames = video_frames(index)
    key, record = f"{source}-{index:05d}", _record(source, index)
    if index % 2 == 0:
        return Example(key, encode_video(frames, VIDEO_FPS), "mp4", record)
    jpegs = []
    for pixels in frames:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    return Example(key, tuple(jpegs), "jpg", record, VIDEO_FPS)


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

    def sources(self, video: bool = True, **weights: float) -> list[dict]:
        """Every source (without the video ones unless ``video``), weighted by ``weights``."""
        return [
            {
                "name": name,
                "shards": str(self.root / name / pattern),
                "task": TASKS[name],
                "weight": weights.get(name, 1.0),
                "languages": ["en", "de"],
                "format": FORMATS.get(name, "pali3"),
                **VIDEO.get(name, {}),
            }
            for name, pattern in self.patterns.items()
            if video or name not in VIDEO
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
                    "max_frames": MAX_FRAMES,
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
            make = video_example if name in VIDEO else example
            examples = [make(name, i) for i in range(count)]
            manifest = write_source(
                examples, root / name, name, [TASKS[name]], ["en", "de"], per_shard
            )
            patterns[name] = manifest.pattern
        for e in examples:
            texts += [*e.record["caption"].values(), *e.record["alt_text"].values()]
            texts += [text for pair in e.record["vqa"]["en"] for text in pair]
    texts += [f"{task} in {lang}:" for task in ("Caption", "Answer", "Caption the video")
              for lang in ("EN", "DE")]  # fmt: skip
    texts += [f"Generate the alt_text in {lang} at 0:" for lang in ("EN", "DE")]
    tokenizer = train_tokenizer(
        texts=texts, vocab_size=200, model_type="bpe", model_path=root / "tok.model"
    )
    return Corpus(root, Path(tokenizer.source), patterns)
