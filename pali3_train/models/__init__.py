"""Model definitions, free of parallelism and training concerns (those are applied from outside)."""

from pali3_train.models.pali3 import PaLI3, PaLI3Output
from pali3_train.models.siglip import SigLIP
from pali3_train.models.text import TextTransformer
from pali3_train.models.ul2 import UL2
from pali3_train.models.vit import MAPHead, VisionTransformer, resample_posemb

__all__ = [
    "MAPHead",
    "PaLI3",
    "PaLI3Output",
    "SigLIP",
    "TextTransformer",
    "UL2",
    "VisionTransformer",
    "resample_posemb",
]
