"""`make demo` for now: build the tiny SigLIP and PaLI-3 models from a config, train each for a
few steps on procedurally drawn shapes, and print parameter counts, losses and a decoded caption.

It exercises the whole model stack end to end on CPU in seconds; the staged curriculum replaces it
as the training engine lands.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from pali3_train.config import Config, load_config_or_exit
from pali3_train.losses.siglip import sigmoid_loss
from pali3_train.models import PaLI3, SigLIP
from pali3_train.params import format_table, parameter_table
from pali3_train.tokenizer import Tokenizer, train_tokenizer

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
PLACES = ("top left", "top right", "bottom left", "bottom right")
PROMPT = "<caption> describe the image"


def draw_scene(size: int, colour: str, place: str) -> torch.Tensor:
    """A square of ``colour`` in one quadrant on a grey background, in [-1, 1] like SigLIP's
    inputs: [3, size, size]."""
    image = torch.full((3, size, size), 0.5)
    half, margin = size // 2, size // 8
    top = margin if place.startswith("top") else half + margin
    left = margin if place.endswith("left") else half + margin
    image[:, top : top + half - 2 * margin, left : left + half - 2 * margin] = torch.tensor(
        COLOURS[colour]
    )[:, None, None]
    return image * 2 - 1


def make_batch(cfg: Config, tokenizer: Tokenizer, rng: random.Random, batch_size: int):
    scenes = [(rng.choice(list(COLOURS)), rng.choice(PLACES)) for _ in range(batch_size)]
    images = torch.stack([draw_scene(cfg.model.vit.image_size_px, c, p) for c, p in scenes])
    captions = [f"a {c} square at {p}" for c, p in scenes]
    prompt, prompt_mask = tokenizer.batch_encode([PROMPT] * batch_size, cfg.data.max_prompt_tokens)
    target, target_mask = tokenizer.batch_encode(captions, cfg.data.max_target_tokens)
    return images, prompt, prompt_mask, target, target_mask, captions


def build_tokenizer(workdir: Path, vocab_size: int) -> Tokenizer:
    sentences = [f"a {c} square at {p}" for c in COLOURS for p in PLACES] + [PROMPT]
    # BPE, because on a corpus this small a unigram model stays near character level.
    return train_tokenizer(
        texts=sentences * 20,
        vocab_size=vocab_size,
        model_type="bpe",
        model_path=workdir / "smoke.model",
        special_symbols=["<caption>"],
    )


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
    rng = random.Random(cfg.train.seed)
    print(format_table(parameter_table(cfg.model), compare_with_paper=False))
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = build_tokenizer(Path(workdir), cfg.model.ul2.vocab_size)
    batch = cfg.train.micro_batch_size

    print("\nstage-0 model (SigLIP, sigmoid loss):")
    siglip = SigLIP(cfg.model)

    def siglip_loss(step: int) -> torch.Tensor:
        images, *_, captions = make_batch(cfg, tokenizer, rng, batch)
        tokens, _ = tokenizer.batch_encode(captions, cfg.model.text.max_len)
        return sigmoid_loss(*siglip(images, tokens), siglip.logit_scale, siglip.logit_bias)

    contrastive = train("siglip", siglip, siglip_loss, cfg)

    print("\nPaLI-3 (captioning, token cross-entropy):")
    pali3 = PaLI3(cfg.model)
    captioning = train(
        "pali3", pali3, lambda step: pali3(*make_batch(cfg, tokenizer, rng, batch)[:5]).loss, cfg
    )

    images, prompt, prompt_mask, _, _, captions = make_batch(cfg, tokenizer, rng, 2)
    pali3.eval()
    decoded = tokenizer.batch_decode(
        pali3.generate(images, prompt, prompt_mask, cfg.data.max_target_tokens, beam_size=2)
    )
    for truth, guess in zip(captions, decoded):
        print(f"  truth: {truth!r:34} decoded: {guess!r}")
    return {"siglip": contrastive, "pali3": captioning}


def plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CPU boxes and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 3.5))
    for ax, (name, curve) in zip(axes, losses.items()):
        ax.plot(range(1, len(curve) + 1), curve)
        ax.set(title=name, xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pali3_train.smoke", description=__doc__)
    parser.add_argument("--config", default="configs/smoke_tiny.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--plot", default="runs/smoke/losses.png", help="loss-curve PNG")
    args = parser.parse_args(argv)
    losses = run(load_config_or_exit(args.config, args.set))
    for name, curve in losses.items():
        print(f"{name}: loss {curve[0]:.4f} -> {curve[-1]:.4f}")
    plot_losses(losses, Path(args.plot))
    print(f"loss curves: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
