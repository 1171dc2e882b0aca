"""A trained PaLI-3 (our kind-"pali3" file) <-> a directory of stock HuggingFace parts, and back.

    python -m pali3_train.convert export runs/stage2/model.safetensors --out pali3-hf/
    python -m pali3_train.convert import pali3 pali3-hf/ --out stage2-again.safetensors

transformers has no PaLI-3 class, so the export is the model's three pieces, each loadable on its
own, with what gluing them needs (``pali3_card`` writes the card with the snippet that does it):

    vision/                  SiglipVisionModel (config.json + model.safetensors), no MAP head
    language/                T5ForConditionalGeneration, untied LM head
    projection.safetensors   weight [d_model, vit width], bias [d_model]
    spiece.model             the tokenizer it was trained with (where the file records one)
    pali3.json               our model config exactly as recorded, and the input conventions
    README.md                the model card

The towers go through the same converters as ``import``/``export`` of single towers
(``siglip``, ``t5``), so the export and the import back are lossless by construction; the model
config is carried verbatim in ``pali3.json``, and the HF configs must agree with it on import.
Every path inside the directory is relative: it can be moved or published as a whole.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pali3_train.config import ModelConfig, config_from_dict
from pali3_train.convert import siglip, t5
from pali3_train.convert.hf_checkpoint import FORMAT, PALI3_MANIFEST, convert_hf, write_hf
from pali3_train.convert.pali3 import pali3_from_towers
from pali3_train.convert.pali3_card import model_card, prompt_formats
from pali3_train.convert.rename import add_prefix, strip_prefix
from pali3_train.convert.safetensors_io import load_weights, read_metadata, save_weights
from pali3_train.stages.generative import EXPORT_KIND as PALI3_KIND
from pali3_train.tokenizer import copy_beside, recorded_tokenizer

log = logging.getLogger(__name__)
VISION, LANGUAGE = "vision", "language"
PROJECTION, TOKENIZER, MANIFEST, CARD = (
    "projection.safetensors",
    "spiece.model",
    PALI3_MANIFEST,
    "README.md",
)
_PARTS = ("vit.", "projection.", "ul2.")


@dataclass(frozen=True)
class Exported:
    directory: Path
    tokenizer: Path | None  # the copy in ``directory``; None: none recorded, or not found


def is_pali3(path: str | Path) -> bool:
    """Whether ``path`` is our PaLI-3 file (not a tower file, nor an HF directory)."""
    path = Path(path)
    return path.is_file() and read_metadata(path).get("kind") == PALI3_KIND


def export_pali3(path: str | Path, out_dir: str | Path) -> Exported:
    """Our kind-"pali3" file -> the HF directory of the module docstring."""
    path, out_dir = Path(path), Path(out_dir)
    metadata = _pali3_metadata(path)
    raw = json.loads(metadata["model"])
    cfg = _model_config(raw, str(path))
    if cfg.temporal_embedding:
        raise ValueError(
            f"{path}: its temporal embedding (model.temporal_embedding) has no place among the "
            "HF parts (SiglipVisionModel, projection, T5); export a model trained without it"
        )
    state = load_weights(path)
    unknown = [k for k in state if not k.startswith(_PARTS)]
    if unknown:
        raise KeyError(f"{path}: not PaLI-3 weights: {', '.join(unknown[:8])}")
    vit = add_prefix(strip_prefix(state, "vit."), "image.")  # our SigLIP's image tower names
    vision_cfg = {**siglip.hf_config(cfg.vit, None), "vision_use_head": False}
    write_hf(siglip.siglip_to_hf(vit, cfg.vit), vision_cfg, out_dir / VISION)
    ul2 = strip_prefix(state, "ul2.")
    write_hf(t5.ul2_to_hf(ul2), t5.hf_config(cfg.ul2), out_dir / LANGUAGE)
    save_weights(strip_prefix(state, "projection."), out_dir / PROJECTION, {"format": "pt"})
    tokenizer = _copy_tokenizer(path, metadata.get("tokenizer"), out_dir / TOKENIZER)
    manifest = {
        "format": FORMAT,
        "kind": PALI3_KIND,
        "model": raw,
        "step": int(metadata["step"]) if "step" in metadata else None,
        "image_size_px": cfg.vit.image_size_px,
        "pixels": "RGB, squashed to a square (antialiased bilinear), scaled to [-1, 1]",
        "prompt": "the prompt's SentencePiece ids then EOS (1), no BOS",
        "prompt_formats": prompt_formats(),
        "tokenizer": TOKENIZER if tokenizer else None,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / CARD).write_text(model_card(manifest, source=path.name))
    return Exported(out_dir, tokenizer)


def import_pali3(src: str | Path, out: str | Path) -> dict[str, object]:
    """An ``export_pali3`` directory -> our kind-"pali3" file at ``out`` (a ``stage.init_from``),
    its tokenizer copied beside it as ``engine/export.py`` does. Returns the model config
    sections."""
    src = Path(src)
    manifest = _read_manifest(src)
    cfg = _model_config(manifest["model"], str(src / MANIFEST))
    vision_sections, image = convert_hf("siglip", src / VISION)
    language_sections, ul2 = convert_hf("t5", src / LANGUAGE)
    for name, found in (("vit", vision_sections["vit"]), ("ul2", language_sections["ul2"])):
        if found != getattr(cfg, name):
            raise ValueError(f"{src}: the HF config of model.{name} disagrees with {MANIFEST}")
    projection = add_prefix(load_weights(src / PROJECTION), "projection.")
    metadata = {"format": FORMAT, "kind": PALI3_KIND, "model": json.dumps(manifest["model"])}
    if manifest.get("step") is not None:
        metadata["step"] = str(manifest["step"])
    if (src / TOKENIZER).is_file():
        copy = copy_beside(out)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / TOKENIZER, copy)
        metadata["tokenizer"] = copy.name  # relative: resolved beside the weights
    save_weights({**pali3_from_towers(image, ul2), **projection}, out, metadata)
    return {name: getattr(cfg, name) for name in manifest["model"]}


def _pali3_metadata(path: Path) -> dict[str, str]:
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pali3-train file (no format={FORMAT!r} in its metadata)")
    if metadata.get("kind") != PALI3_KIND:
        raise ValueError(
            f"{path}: a {metadata.get('kind')} file where a {PALI3_KIND} one is needed"
        )
    return metadata


def _read_manifest(src: Path) -> dict:
    path = src / MANIFEST
    if not path.is_file():
        what = (
            "an HF tower checkpoint: import it as siglip or t5"
            if (src / "config.json").is_file()
            else "not an exported PaLI-3 directory"
        )
        raise FileNotFoundError(f"{path}: missing; {src} is {what}")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != PALI3_KIND:
        raise ValueError(
            f"{path}: a {manifest.get('kind')} manifest where a {PALI3_KIND} one is needed"
        )
    return manifest


def _model_config(raw: dict, source: str) -> ModelConfig:
    return config_from_dict({"model": raw}, source=source).model


def _copy_tokenizer(weights: Path, recorded: str | None, copy: Path) -> Path | None:
    """The recorded tokenizer copied to ``copy``; None (with a warning) where there is none."""
    source = recorded_tokenizer(weights, recorded)
    if source is None or not source.is_file():
        why = "records no tokenizer" if source is None else f"names {source}, which is not there"
        log.warning("export: %s %s; exported without spiece.model", weights, why)
        return None
    shutil.copyfile(source, copy)
    return copy
