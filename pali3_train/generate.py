"""Answers from a trained PaLI-3 on the command line.

    python -m pali3_train.generate --checkpoint runs/demo/stage2/model.safetensors \\
        --image photo.png photos/ --prompt "Caption in EN:"
    python -m pali3_train.generate --checkpoint runs/demo/stage2/model.safetensors \\
        --input questions.jsonl --out answers.jsonl --batch-size 16
    python -m pali3_train.generate --checkpoint runs/video/model.safetensors \\
        --video clip.mp4 --prompt "Caption the video in EN:"

Each prints (or writes, ``--out``) one JSON line per input, in input order:
``{"image": ..., "prompt": ..., "answer": ...}`` (``"video"`` for a video), plus the input's
``"id"`` where it has one. ``--image`` takes files and folders (a folder's .jpg/.jpeg/.png/.webp
files, sorted) and applies ``--prompt`` to each; ``--video`` takes mp4/webm files, each read as
the clip evaluation reads (``data_pipeline/video.py``): ``--max-frames`` frames a fixed stride
apart (``--frame-stride-s`` or ``--frame-stride-frames``), centred in the video, a shorter video
padded and masked. Both default to what the model was trained with, where its export (or
checkpoint folder) records it: the stage's ``data.max_frames`` and its video sources' stride
(a stage whose video sources used different strides leaves the stride to the command line);
without that record, 16 frames 1 s apart. ``--input`` takes a JSONL file
of ``{"image": path, "prompt": text}`` or ``{"video": path, "prompt": text}`` lines (an optional
``"id"``; relative paths are relative to the JSONL's folder). Inputs are decoded and answered
``--batch-size`` at a time (a batch holds images or videos, not both), so memory stays bounded
however many there are.
Prompts in a batch are padded to the longest, and the prompt mask keeps the padding out of the
answers: in fp32 they are the same whatever the batch size. In bf16 the padded length still
changes rounding in the cross-attention (about one bf16 step in the logits), which can flip a
near-tie between two tokens.

``--checkpoint`` takes what a stage exports (``<run_dir>/model.safetensors``, which records its
model config, with a copy of its tokenizer beside it as ``model.spiece.model``) or a training
checkpoint folder (``step_NNNNNNNN``, consolidated on the fly). Prompts are those of training
(``data_pipeline/tasks.py``): ``Caption in EN:``, ``Answer in EN: what colour is the circle?``,
``Generate the ocr_text in EN:``; for videos ``Caption the video in EN:`` and ``Answer in EN:
what appears?``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import torch
from tqdm import tqdm

from pali3_train.cli import command_parser
from pali3_train.config import ModelConfig, config_from_dict
from pali3_train.config.schema import MAX_FRAMES
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.data_pipeline.transforms import Batch, decode_image, model_input
from pali3_train.data_pipeline.video import FrameStride, UndecodableVideo, sample_clip
from pali3_train.eval.answers import generate_answers
from pali3_train.models import PaLI3
from pali3_train.precision import COMPUTE_DTYPES, compute_dtype
from pali3_train.stages.generative import EXPORT_KIND as PALI3_KIND
from pali3_train.stages.registry import spec_for
from pali3_train.tokenizer import Tokenizer, recorded_tokenizer


def load_pali3(checkpoint: str | Path, tokenizer: str | Path | None = None):
    """(model in eval mode, tokenizer) from an exported file or a checkpoint folder; the
    tokenizer defaults to the one the model was trained with."""
    path = Path(checkpoint)
    if path.is_dir():
        from pali3_train.engine.checkpoint import tokenizer_of
        from pali3_train.engine.export import consolidated_weights

        meta, state = consolidated_weights(path)
        model_dict, trained_with = meta.config["model"], tokenizer_of(path, meta)
        kind = spec_for(config_from_dict(meta.config)).export_kind
    else:
        metadata = read_metadata(path)
        model_dict = json.loads(metadata["model"])
        trained_with = recorded_tokenizer(path, metadata.get("tokenizer"))
        state, kind = load_weights(path), metadata.get("kind")
    if kind != PALI3_KIND:
        raise ValueError(f"{path}: a {kind} checkpoint is not PaLI-3: it has no text decoder")
    model_cfg: ModelConfig = config_from_dict({"model": model_dict}).model
    model = PaLI3(model_cfg)
    model.load_state_dict(state)
    tokenizer = tokenizer or trained_with
    if tokenizer is None:
        raise ValueError(f"{path} does not name its tokenizer: pass --tokenizer")
    return model.eval(), Tokenizer.load(tokenizer)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MEDIA = ("image", "video")  # what an input's file is: its key in a JSONL line and its output


class InputError(ValueError):
    """Bad input, found before the model is loaded; ``main`` reports it as a usage error."""


@dataclass(frozen=True)
class Item:
    """One question: ``file`` is the image or video read; ``echo`` is what its output line
    repeats of the input (the path as written under "image" or "video", the prompt, the id
    where one was given)."""

    file: Path
    echo: dict[str, Any]

    @property
    def medium(self) -> str:
        return "video" if "video" in self.echo else "image"


@dataclass(frozen=True)
class Clips:
    """How a video becomes a clip: ``max_frames`` frames ``stride`` apart, centred. The defaults
    are for a model that does not record how it was trained (``recorded_clips``)."""

    max_frames: int = MAX_FRAMES
    stride: FrameStride = FrameStride(seconds=1.0)


def recorded_clips(checkpoint: str | Path) -> dict | None:
    """How the model's training stage read its clips (``engine.export.clip_settings``): from an
    export's metadata or a checkpoint folder's config; None where it had no video source or the
    file predates the record."""
    path = Path(checkpoint)
    if path.is_dir():
        from pali3_train.engine.checkpoint import read_meta
        from pali3_train.engine.export import clip_settings

        return clip_settings(config_from_dict(read_meta(path).config))
    recorded = read_metadata(path).get("clips")
    return json.loads(recorded) if recorded else None


def trained_clips(recorded: dict | None, max_frames: int | None = None,
                  stride: FrameStride | None = None) -> Clips:  # fmt: skip
    """The clip settings to use: ``max_frames`` and ``stride`` where given (the command line),
    else what the model ``recorded``, else ``Clips``' defaults. Raises ``InputError`` where the
    stride is not given and the recorded video sources disagree on theirs."""
    if recorded is None:
        recorded = {}
    if max_frames is None:
        max_frames = recorded.get("max_frames", Clips.max_frames)
    if stride is None:
        strides = recorded.get("strides", {})
        distinct = {tuple(sorted(s.items())) for s in strides.values()}
        if len(distinct) > 1:
            each = ", ".join(f"{name}: {_stride_text(s)}" for name, s in strides.items())
            raise InputError(
                f"the model trained on video sources of different strides ({each}): pass "
                "--frame-stride-s or --frame-stride-frames"
            )
        stride = FrameStride(**dict(distinct.pop())) if distinct else Clips.stride
    return Clips(max_frames, stride)


def _stride_text(stride: dict) -> str:
    if "seconds" in stride:
        return f"{stride['seconds']} s"
    return f"{stride['frames']} frames"


def items_from_images(paths: Sequence[Path], prompt: str) -> list[Item]:
    """Files as given and folders as their image files, sorted, each asked ``prompt``."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image(p))
            if not found:
                raise InputError(f"--image: {path} holds no {'/'.join(IMAGE_SUFFIXES)} file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"--image: {path} is not a file")
    return [Item(f, {"image": str(f), "prompt": prompt}) for f in files]


def items_from_videos(paths: Sequence[Path], prompt: str) -> list[Item]:
    """Video files as given, each asked ``prompt``."""
    for path in paths:
        if not path.is_file():
            raise InputError(f"--video: {path} is not a file")
    return [Item(p, {"video": str(p), "prompt": prompt}) for p in paths]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def items_from_jsonl(path: Path) -> list[Item]:
    """The questions of a JSONL file, one ``{"image", "prompt"[, "id"]}`` object a line (blank
    lines skipped); every line is checked, so a typo fails before the model is loaded."""
    if not path.is_file():
        raise InputError(f"--input: {path} is not a file")
    items = [
        _jsonl_item(line, path.parent, f"--input {path}:{number}")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip()
    ]
    if not items:
        raise InputError(f"--input: {path} holds no question")
    return items


def _jsonl_item(line: str, folder: Path, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: not a JSON object")
    media = [m for m in MEDIA if m in record]
    if len(media) != 1:
        found = "both" if media else "no"
        raise InputError(f'{where}: {found} "image" field {"and" if media else "or"} "video" field')
    medium = media[0]
    for field in (medium, "prompt"):
        if field not in record:
            raise InputError(f'{where}: no "{field}" field')
        if not isinstance(record[field], str):
            raise InputError(f'{where}: "{field}" is not a string')
    file = folder / record[medium]  # an absolute path replaces the folder
    if not file.is_file():
        raise InputError(f"{where}: {medium} {file} is not a file")
    return Item(file, {k: record[k] for k in ("id", medium, "prompt") if k in record})


def prepare(
    files: Sequence[Path],
    prompts: Sequence[str],
    tokenizer: Tokenizer,
    image_size_px: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clips: Clips | None = None,
) -> Batch:
    """Image files (or, with ``clips``, video files) and their prompts -> a model-ready batch on
    ``device`` with pixels in ``dtype``, as the data pipeline would make it for evaluation.
    Prompts are right-padded to the longest one; the prompt mask keeps the padding out of every
    answer (up to bf16 rounding: see above)."""
    if len(files) != len(prompts):
        raise ValueError(f"{len(files)} inputs for {len(prompts)} prompts")
    pixels, frame_mask = _pixels(files, image_size_px, clips)
    longest = max(len(tokenizer.encode(prompt)) for prompt in prompts)
    ids, mask = tokenizer.batch_encode(list(prompts), longest)
    names = tuple(str(p) for p in files)
    empty = torch.zeros(len(files), 1, dtype=torch.long)
    batch = Batch(pixels, ids, mask, empty, empty.bool(), names, names, 0, {},
                  frame_mask=frame_mask)  # fmt: skip
    return model_input(batch, torch.device(device), dtype)


def _pixels(
    files: Sequence[Path], size_px: int, clips: Clips | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (uint8 images [B, 3, S, S], None), or with ``clips`` (uint8 clips [B, F, 3, S, S],
    their frame mask [B, F]): each video's centred clip, as evaluation samples it."""
    if clips is None:
        return torch.stack([decode_image(Path(p).read_bytes(), size_px) for p in files]), None
    sampled = []
    for path in files:
        try:
            sampled.append(sample_clip(Path(path).read_bytes(), size_px, clips.max_frames,
                                       clips.stride, rng=None))  # fmt: skip
        except UndecodableVideo as e:
            raise UndecodableVideo(f"{path}: {e}") from None
    frames, masks = zip(*sampled)
    return torch.stack(frames), torch.stack(masks)


def answer_items(
    model: PaLI3,
    tokenizer: Tokenizer,
    items: Sequence[Item],
    batch_size: int,
    max_tokens: int,
    beam_size: int = 1,
    clips: Clips = Clips(),
) -> Iterator[dict[str, Any]]:
    """Each item's output record, in input order. Inputs are decoded ``batch_size`` at a time,
    on the model's device and in its dtype, so memory does not grow with the input; videos
    become ``clips``; a progress bar goes to stderr (a terminal only) when there is more than
    one batch."""
    weight = next(model.parameters())
    batches = list(_batches(items, batch_size))
    for chunk in tqdm(batches, unit="batch", disable=True if len(batches) < 2 else None):
        prompts = [item.echo["prompt"] for item in chunk]
        batch = prepare([item.file for item in chunk], prompts, tokenizer,
                        model.cfg.vit.image_size_px, weight.device, weight.dtype,
                        clips if chunk[0].medium == "video" else None)  # fmt: skip
        answers = generate_answers(model, tokenizer, batch, max_tokens, beam_size)
        for item, answer in zip(chunk, answers):
            yield item.echo | {"answer": answer}


def _batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    """Consecutive items, at most ``size`` a batch, a new batch wherever images give way to
    videos or back (a batch's pixels are all images or all clips)."""
    start = 0
    for end in range(1, len(items) + 1):
        if end == len(items) or end - start == size or items[end].medium != items[start].medium:
            yield items[start:end]
            start = end


@contextmanager
def output_stream(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a temporary file beside ``path`` renamed to it once every line is written, so a
    crash leaves no half-written file under that name."""
    if path is None:
        yield sys.stdout
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _frames(text: str) -> int:
    value = _positive(text)
    if value > MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_FRAMES}, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.generate", __doc__)
    parser.add_argument("--checkpoint", required=True, help="model.safetensors or step_* folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", type=Path, help="image files and folders")
    source.add_argument("--video", nargs="+", type=Path, help="mp4/webm video files")
    source.add_argument("--input", type=Path,
                        help='JSONL: {"image" or "video": ..., "prompt": ...} a line')  # fmt: skip
    parser.add_argument("--prompt", help='with --image or --video: e.g. "Caption in EN:" '
                        '(a video: "Caption the video in EN:")')  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSONL file to write; default: stdout")
    parser.add_argument("--tokenizer", help="default: the one recorded with the checkpoint")
    parser.add_argument("--batch-size", type=_positive, default=8, help="inputs per forward")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES),
                        help="default: bf16 on CUDA, fp32 on CPU")  # fmt: skip
    parser.add_argument("--beam-size", type=_positive, default=1, help="1: greedy decoding")
    parser.add_argument("--max-tokens", type=_positive, default=32, help="answer length limit")
    parser.add_argument("--max-frames", type=_frames,
                        help=f"frames a video's clip takes (1..{MAX_FRAMES}); default: the "
                        "training stage's data.max_frames where the checkpoint records it, "
                        f"else {MAX_FRAMES}")  # fmt: skip
    stride = parser.add_mutually_exclusive_group()
    stride.add_argument("--frame-stride-s", type=_seconds,
                        help="seconds between a clip's frames; default: the stride of the "
                        "training stage's video sources where the checkpoint records it, else "
                        "1.0")  # fmt: skip
    stride.add_argument(
        "--frame-stride-frames",
        type=_positive,
        help="frames between a clip's frames (instead of --frame-stride-s)",
    )
    return parser


def _items(args: argparse.Namespace) -> list[Item]:
    if args.input is not None:
        if args.prompt is not None:
            raise InputError("--prompt goes with --image or --video; --input lines carry their own")
        return items_from_jsonl(args.input)
    given = "--image" if args.image is not None else "--video"
    if args.prompt is None:
        raise InputError(f"{given} needs --prompt")
    if args.image is not None:
        return items_from_images(args.image, args.prompt)
    return items_from_videos(args.video, args.prompt)


def _clips(args: argparse.Namespace, items: Sequence[Item]) -> Clips:
    """The command line's clip settings, what the checkpoint records where it gives none (read
    only when there is a video to answer), then the defaults."""
    if args.frame_stride_frames is not None:
        stride = FrameStride(frames=args.frame_stride_frames)
    elif args.frame_stride_s is not None:
        stride = FrameStride(seconds=args.frame_stride_s)
    else:
        stride = None
    given = args.max_frames is not None and stride is not None
    videos = any(item.medium == "video" for item in items)
    recorded = recorded_clips(args.checkpoint) if videos and not given else None
    return trained_clips(recorded, args.max_frames, stride)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.out is not None and not args.out.parent.is_dir():
            raise InputError(f"--out: {args.out.parent} is not a folder")
        items, device = _items(args), _device(args.device)
        clips = _clips(args, items)
    except InputError as e:
        parser.error(str(e))
    dtype = compute_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    model, tokenizer = load_pali3(args.checkpoint, args.tokenizer)
    model = model.to(device, dtype)
    records = answer_items(model, tokenizer, items, args.batch_size, args.max_tokens,
                           args.beam_size, clips)  # fmt: skip
    with output_stream(args.out) as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
