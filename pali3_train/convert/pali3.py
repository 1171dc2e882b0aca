"""Assemble PaLI-3 weights from the two pretrained towers: the SigLIP image tower (its MAP head
and text tower are left behind) and the UL2 encoder-decoder. The projection between them is new
and stays at its initialisation.

    python -m pali3_train.convert assemble --vision SIGLIP --language T5 --out init.safetensors

Each tower is an HF checkpoint directory or our file (``import``'s, or a stage-0 export); the
result is a PaLI-3 file that a stage-1 config names in ``stage.init_from``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pali3_train.convert.hf_checkpoint import FORMAT, tower
from pali3_train.convert.rename import StateDict, add_prefix, strip_prefix
from pali3_train.convert.safetensors_io import save_weights

NEW_IN_PALI3 = ("projection.weight", "projection.bias")


def pali3_from_towers(siglip: StateDict, ul2: StateDict) -> StateDict:
    """Our ``SigLIP`` and ``UL2`` state dicts -> a partial ``PaLI3`` state dict, to be loaded
    with ``strict=False``; exactly ``NEW_IN_PALI3`` remain missing."""
    return {**add_prefix(strip_prefix(siglip, "image."), "vit."), **add_prefix(ul2, "ul2.")}


def assemble(vision: str | Path, language: str | Path, out: str | Path) -> dict[str, object]:
    """A SigLIP and a T5/UL2 tower -> one PaLI-3 ``stage.init_from`` file at ``out``, recording
    the ``vit`` and ``ul2`` config sections it was made from. Returns those sections."""
    from pali3_train.stages.generative import EXPORT_KIND  # the stages import the converters

    vit_sections, siglip = tower("siglip", vision)
    ul2_sections, ul2 = tower("t5", language)
    sections = {"vit": vit_sections["vit"], "ul2": ul2_sections["ul2"]}
    metadata = {
        "format": FORMAT,
        "kind": EXPORT_KIND,
        "model": json.dumps({k: dataclasses.asdict(v) for k, v in sections.items()}),
    }
    save_weights(pali3_from_towers(siglip, ul2), out, metadata)
    return sections
