"""Command line: ``python -m pali3_train.convert {import,export,assemble} ...``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from pali3_train.convert.hf_checkpoint import KINDS, export_hf, import_hf
from pali3_train.convert.pali3 import assemble


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pali3_train.convert",
        description="Convert SigLIP / T5-UL2 checkpoints between "
        "HuggingFace safetensors and pali3-train.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint directory -> pali3-train safetensors")
    imp.add_argument("kind", choices=KINDS)
    imp.add_argument("src", help="directory with config.json and (sharded) safetensors")
    imp.add_argument("out", help="output .safetensors file")
    exp = sub.add_parser("export", help="pali3-train safetensors -> HF checkpoint directory")
    exp.add_argument("src", help="a .safetensors file written by `import` or by training")
    exp.add_argument("out", help="output directory")
    asm = sub.add_parser("assemble", help="SigLIP + T5/UL2 towers -> a PaLI-3 stage.init_from file")
    asm.add_argument("--vision", required=True, help="SigLIP: HF directory or our .safetensors")
    asm.add_argument("--language", required=True, help="T5/UL2: HF directory or our .safetensors")
    asm.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        if args.command in ("import", "assemble"):
            if args.command == "import":
                sections = import_hf(args.kind, args.src, args.out)
            else:
                sections = assemble(args.vision, args.language, args.out)
            print(f"wrote {args.out}; its model section:")
            print(
                yaml.safe_dump(
                    {"model": {k: dataclasses.asdict(v) for k, v in sections.items()}},
                    sort_keys=False,
                )
            )
        else:
            print(f"wrote {export_hf(args.src, args.out)}")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
