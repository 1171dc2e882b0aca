"""Convert SigLIP and T5/UL2 towers and trained PaLI-3 models between HuggingFace checkpoints
and pali3-train's safetensors files.

    python -m pali3_train.convert import {siglip,t5,pali3} SRC --out FILE [--model-yaml FILE]
    python -m pali3_train.convert export FILE --out DIR
    python -m pali3_train.convert assemble --vision SRC --language SRC --out FILE

``import``/``export`` move one tower (siglip, t5) or a whole trained PaLI-3 (``pali3_hf``)
between HuggingFace checkpoints and our safetensors files; ``export`` tells which by the file's
metadata. ``assemble`` joins two towers into a PaLI-3 ``stage.init_from`` file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from pali3_train.cli import command_parser, subcommand_options
from pali3_train.convert.hf_checkpoint import KINDS, export_hf, import_hf
from pali3_train.convert.pali3 import assemble
from pali3_train.convert.pali3_hf import PALI3_KIND, export_pali3, import_pali3, is_pali3


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.convert", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint directory -> pali3-train safetensors",
                         **subcommand_options())  # fmt: skip
    imp.add_argument(
        "kind",
        choices=(*KINDS, PALI3_KIND),
        help="a tower, or pali3: a directory written by `export` of a PaLI-3",
    )
    imp.add_argument(
        "src",
        help="directory with config.json and (sharded) safetensors, or for "
        "pali3 the exported directory (vision/, language/, pali3.json, ...)",
    )
    imp.add_argument(
        "--out", required=True, help="output .safetensors file (pali3: its tokenizer beside it)"
    )
    _model_yaml_option(imp)
    exp = sub.add_parser("export", help="pali3-train safetensors -> HF checkpoint directory",
                         **subcommand_options())  # fmt: skip
    exp.add_argument(
        "src",
        help="a .safetensors file written by `import`, `assemble` or training: "
        "a tower, or a PaLI-3 (then a directory of HF parts and a model card)",
    )
    exp.add_argument("--out", required=True, help="output directory")
    asm = sub.add_parser("assemble", help="SigLIP + T5/UL2 towers -> a PaLI-3 stage.init_from file",
                         **subcommand_options())  # fmt: skip
    asm.add_argument("--vision", required=True, help="SigLIP: HF directory or our .safetensors")
    asm.add_argument("--language", required=True, help="T5/UL2: HF directory or our .safetensors")
    asm.add_argument("--out", required=True, help="output .safetensors file")
    _model_yaml_option(asm)
    return parser


def _model_yaml_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model-yaml",
        metavar="FILE",
        help="also write the model section matching the weights to FILE, for a config's "
        "include: list (default: printed only)",
    )


def _report_sections(out: str, sections: dict[str, object], model_yaml: str | None) -> None:
    """Print the model section that matches the weights at ``out``, and write it to
    ``model_yaml`` if given: the file a stage config includes, so its model is the weights'."""
    # towers as their fields; flags (model.temporal_embedding) as they are
    model = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
             for k, v in sections.items()}  # fmt: skip
    text = yaml.safe_dump({"model": model}, sort_keys=False)
    if model_yaml:
        Path(model_yaml).write_text(f"# the model section of {out}\n{text}")
        print(f"wrote {out} and its model section to {model_yaml}:")
    else:
        print(f"wrote {out}; its model section:")
    print(text)


def _export(src: str, out: str) -> None:
    if not is_pali3(src):
        print(f"wrote {export_hf(src, out)}")
        return
    exported = export_pali3(src, out)
    print(
        f"wrote {exported.directory}: vision/, language/, projection.safetensors, pali3.json, "
        "README.md"
    )
    if exported.tokenizer is None:
        print(f"no tokenizer: {src} records none that exists; add spiece.model to {out} by hand")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import" and args.kind == PALI3_KIND:
            _report_sections(args.out, import_pali3(args.src, args.out), args.model_yaml)
        elif args.command == "import":
            _report_sections(args.out, import_hf(args.kind, args.src, args.out), args.model_yaml)
        elif args.command == "assemble":
            sections = assemble(args.vision, args.language, args.out)
            _report_sections(args.out, sections, args.model_yaml)
        else:
            _export(args.src, args.out)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
