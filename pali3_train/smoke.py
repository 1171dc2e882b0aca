"""`make demo` for now: generate the demo corpus, then train the tiny SigLIP on its captions and
the tiny PaLI-3 on its task mixture, both fed by the real data pipeline, and print parameter
counts, losses and decoded answers.

It exercises the model stack and the data path end to end on CPU in seconds; the staged
curriculum replaces it as the training engine lands.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from data_pipeline.demo_corpus import build_demo_corpus
from data_pipeline.loader import DataPipeline
from data_pipeline.transforms import Batch, normalize_images
from pali3_train.config import Config, load_config_or_exit
from pali3_train.losses.siglip import sigmoid_loss
from pali3_train.models import PaLI3, SigLIP
from pali3_train.params import format_table, parameter_table
from pali3_train.plots import plot_curves
from pali3_train.tokenizer import Tokenizer


def train(name: str, model: torch.nn.Module, loss_fn, cfg: Config) -> list[float]:
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=cfg.train.adam_betas,
        eps=cfg.train.adam_eps,
        weight_decay=cfg.train.weight_decay,
    )
    losses, start = [], time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % 10 == 0 or step == cfg.train.steps:
            rate = step * cfg.train.micro_batch_size / (time.perf_counter() - start)
            print(
                f"  [{name}] step {step:>3}/{cfg.train.steps}  loss {loss.item():.4f}  "
                f"{rate:.0f} samples/s"
            )
    return losses


def run(cfg: Config) -> dict[str, list[float]]:
    torch.manual_seed(cfg.train.seed)
    print(format_table(parameter_table(cfg.model), compare_with_paper=False))
    with tempfile.TemporaryDirectory() as workdir:
        corpus = build_demo_corpus(
            workdir,
            cfg.train.seed,
            samples_per_source=256,
            samples_per_shard=32,
            image_size_px=cfg.model.vit.image_size_px,
            vocab_size=cfg.model.ul2.vocab_size,
        )
        tokenizer = Tokenizer.load(corpus.tokenizer_path)
        data = replace(cfg.data, tokenizer_path=str(corpus.tokenizer_path))
        batch = cfg.train.micro_batch_size

        print("\nstage-0 model (SigLIP, sigmoid loss) on the demo captions:")
        captions_only = corpus.sources(
            dict.fromkeys(("alt_text", "split_caption", "vqa", "ocr"), 0)
        )
        siglip_data = replace(data, sources=captions_only, max_target_tokens=cfg.model.text.max_len)
        captions = iter(DataPipeline(replace(cfg, data=siglip_data), 0, 1, batch))
        siglip = SigLIP(cfg.model)

        def siglip_loss(step: int) -> torch.Tensor:
            b = next(captions)
            embeddings = siglip(normalize_images(b.images), b.target)
            return sigmoid_loss(*embeddings, siglip.logit_scale, siglip.logit_bias)

        contrastive = train("siglip", siglip, siglip_loss, cfg)

        print("\nPaLI-3 on the demo task mixture (token cross-entropy):")
        mixture = iter(
            DataPipeline(replace(cfg, data=replace(data, sources=corpus.sources())), 0, 1, batch)
        )
        pali3 = PaLI3(cfg.model)

        def pali3_loss(step: int) -> torch.Tensor:
            b = next(mixture)
            return pali3(
                normalize_images(b.images), b.prompt, b.prompt_mask, b.target, b.target_mask
            ).loss

        captioning = train("pali3", pali3, pali3_loss, cfg)
        show_predictions(pali3, next(mixture), tokenizer, cfg.data.max_target_tokens)
    return {"siglip": contrastive, "pali3": captioning}


def show_predictions(pali3: PaLI3, b: Batch, tokenizer: Tokenizer, max_len: int) -> None:
    pali3.eval()
    with torch.no_grad():
        tokens = pali3.generate(normalize_images(b.images), b.prompt, b.prompt_mask, max_len, 2)
    for prompt, truth, guess in zip(
        tokenizer.batch_decode(b.prompt),
        tokenizer.batch_decode(b.target),
        tokenizer.batch_decode(tokens),
    ):
        print(f"  {prompt!r:48} truth: {truth!r:36} decoded: {guess!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pali3_train.smoke", description=__doc__)
    parser.add_argument("--config", default="configs/smoke_tiny.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--plot", default="runs/smoke/losses.png", help="loss-curve PNG")
    args = parser.parse_args(argv)
    losses = run(load_config_or_exit(args.config, args.set))
    for name, curve in losses.items():
        print(f"{name}: loss {curve[0]:.4f} -> {curve[-1]:.4f}")
    plot_curves({k: (range(1, len(v) + 1), v) for k, v in losses.items()}, Path(args.plot))
    print(f"loss curves: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
