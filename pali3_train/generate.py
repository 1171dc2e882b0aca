"""Answers from a trained PaLI-3 on the command line.

    python -m pali3_train.generate --checkpoint runs/demo/stage2/model.safetensors \\
        --image photo.png --prompt "Caption in EN:"

``--checkpoint`` takes what a stage exports (``<run_dir>/model.safetensors``, which records its
model config, with a copy of its tokenizer beside it as ``model.spiece.model``) or a training
checkpoint folder (``step_NNNNNNNN``, consolidated on the fly). Prompts are those of training
(``data_pipeline/tasks.py``): ``Caption in EN:``, ``Answer in EN: what colour is the circle?``,
``Generate the ocr_text in EN:``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data_pipeline.transforms import Batch, decode_image, model_input
from pali3_train.config import ModelConfig, config_from_dict
from pali3_train.convert.safetensors_io import load_weights, read_metadata
from pali3_train.eval.answers import generate_answers
from pali3_train.models import PaLI3
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


def prepare(images: list[Path], prompt: str, tokenizer: Tokenizer, image_size_px: int) -> Batch:
    """Image files and one prompt -> a model-ready batch, as the data pipeline would make it."""
    pixels = torch.stack([decode_image(Path(p).read_bytes(), image_size_px) for p in images])
    ids, mask = tokenizer.batch_encode([prompt] * len(images), len(tokenizer.encode(prompt)))
    names = tuple(str(p) for p in images)
    empty = torch.zeros(len(images), 1, dtype=torch.long)
    batch = Batch(pixels, ids, mask, empty, empty.bool(), names, names, 0, {})
    return model_input(batch, torch.device("cpu"), torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model.safetensors or step_* folder")
    parser.add_argument("--image", required=True, nargs="+", type=Path)
    parser.add_argument("--prompt", required=True, help='e.g. "Caption in EN:"')
    parser.add_argument("--tokenizer", help="default: the one recorded with the checkpoint")
    parser.add_argument("--beam-size", type=int, default=1, help="1: greedy decoding")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    args = parser.parse_args(argv)
    for image in args.image:
        if not image.is_file():
            parser.error(f"--image: {image} is not a file")
    model, tokenizer = load_pali3(args.checkpoint, args.tokenizer)
    batch = prepare(args.image, args.prompt, tokenizer, model.cfg.vit.image_size_px)
    answers = generate_answers(model, tokenizer, batch, args.max_tokens, args.beam_size)
    for image, answer in zip(args.image, answers):
        print(f"{image}\t{answer}")


if __name__ == "__main__":
    main()
