"""Assemble PaLI-3 weights from the two pretrained towers: the SigLIP image tower (its MAP head
and text tower are left behind) and the UL2 encoder-decoder. The projection between them is new
and stays at its initialisation."""

from __future__ import annotations

from pali3_train.convert.rename import StateDict, add_prefix, strip_prefix

NEW_IN_PALI3 = ("projection.weight", "projection.bias")


def pali3_from_towers(siglip: StateDict, ul2: StateDict) -> StateDict:
    """Our ``SigLIP`` and ``UL2`` state dicts -> a partial ``PaLI3`` state dict, to be loaded
    with ``strict=False``; exactly ``NEW_IN_PALI3`` remain missing."""
    return {**add_prefix(strip_prefix(siglip, "image."), "vit."), **add_prefix(ul2, "ul2.")}
