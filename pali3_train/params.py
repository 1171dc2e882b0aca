"""Parameter counts per component, computed on the meta device (no weights are allocated), so
that even the 5B preset is sized in a second on a laptop.

    python -m pali3_train.params --model configs/models/pali3_5b.yaml
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import torch
from torch import nn

from pali3_train.cli import command_parser
from pali3_train.config import ModelConfig, add_overrides_option, load_config_or_exit
from pali3_train.models import PaLI3, SigLIP

# PaLI-3 paper (arXiv 2310.09199), Figure 1 and abstract: a 2B SigLIP image encoder, a 3B UL2
# encoder-decoder, 5B in all.
PAPER = {"vision": 2.0e9, "language": 3.0e9, "total": 5.0e9}


class Row(NamedTuple):
    name: str
    params: int
    paper: float | None = None
    indent: int = 0


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(cfg: ModelConfig) -> list[Row]:
    with torch.device("meta"):
        pali3, siglip = PaLI3(cfg), SigLIP(cfg)
    ul2 = pali3.ul2
    vision, projection = count(pali3.vit), count(pali3.projection)
    language = count(ul2)
    return [
        Row("vision: SigLIP ViT (tokens)", vision, PAPER["vision"]),
        Row("projection", projection),
        Row("language: UL2 encoder-decoder", language, PAPER["language"]),
        Row("shared embedding", count(ul2.embed), indent=1),
        Row(
            "encoder",
            count(ul2.encoder_layers) + count(ul2.encoder_norm) + count(ul2.encoder_bias),
            indent=1,
        ),
        Row(
            "decoder",
            count(ul2.decoder_layers) + count(ul2.decoder_norm) + count(ul2.decoder_bias),
            indent=1,
        ),
        Row("LM head", count(ul2.lm_head), indent=1),
        Row("PaLI-3 total", count(pali3), PAPER["total"]),
        Row("stage 0 only: MAP head", count(siglip.image_head)),
        Row("stage 0 only: text tower", count(siglip.text)),
    ]


def format_table(rows: list[Row], compare_with_paper: bool = True) -> str:
    """Counts in a text table; with ``compare_with_paper``, the PaLI-3 paper's sizes beside them."""
    header = f"{'component':<34}{'params':>16}{'billions':>10}"
    lines = [header + (f"{'paper':>8}{'diff':>9}" if compare_with_paper else "")]
    for row in rows:
        line = f"{'  ' * row.indent + row.name:<34}{row.params:>16,}{row.params / 1e9:>10.3f}"
        if compare_with_paper and row.paper:
            line += f"{row.paper / 1e9:>7.0f}B{(row.params - row.paper) / row.paper:>+9.1%}"
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.params", __doc__)
    parser.add_argument("--model", required=True, help="a model preset or any config YAML")
    add_overrides_option(parser, "e.g. model.vit.depth=48")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config_or_exit(args.model, args.set)
    print(format_table(parameter_table(cfg.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
