"""Import published HuggingFace checkpoints into pali3-train's format, and export back.

Our format is one safetensors file whose metadata records the tower's kind and its model config
section, so that a file describes itself: ``export_hf`` needs nothing else to write an HF
``config.json``, and the printed YAML can be pasted into a preset. A whole trained PaLI-3 is
exported and imported by ``pali3_hf``, tower by tower through the functions here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from pali3_train.config import config_from_dict
from pali3_train.convert import siglip, t5
from pali3_train.convert.safetensors_io import (
    WEIGHTS_NAME,
    StateDict,
    load_weights,
    read_metadata,
    save_weights,
)

Kind = Literal["siglip", "t5"]
KINDS = ("siglip", "t5")
FORMAT = "pali3-train"
PALI3_MANIFEST = "pali3.json"  # what marks an exported PaLI-3 directory (``pali3_hf``)


def _read_hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file() and (src / PALI3_MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: missing; {src} is an exported PaLI-3: import it as pali3")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; a HuggingFace checkpoint directory holds "
            f"config.json beside its safetensors weights"
        )
    return json.loads(path.read_text())


def _sections_from_hf(kind: Kind, hf_cfg: dict, src: Path) -> dict[str, object]:
    if kind == "t5":
        return {"ul2": t5.ul2_config_from_hf(hf_cfg)}
    if siglip.is_vision_only(hf_cfg):  # a SiglipVisionModel: the image tower (and MAP head) alone
        return {"vit": siglip.vit_config_from_hf(hf_cfg)}
    if "vision_config" not in hf_cfg or "text_config" not in hf_cfg:
        raise ValueError(
            f"{src / 'config.json'}: not a SigLIP config (neither a SiglipModel's vision_config "
            "and text_config nor a SiglipVisionModel's patch_size and hidden_size)"
        )
    return {
        "vit": siglip.vit_config_from_hf(hf_cfg["vision_config"]),
        "text": siglip.text_config_from_hf(hf_cfg["text_config"]),
    }


def convert_hf(kind: Kind, src: str | Path) -> tuple[dict[str, object], StateDict]:
    """HF checkpoint directory -> (our model config sections, our state dict), in memory."""
    src = Path(src)
    hf_cfg = _read_hf_config(src)
    sections = _sections_from_hf(kind, hf_cfg, src)
    weights = load_weights(src)
    if kind == "siglip":
        return sections, siglip.siglip_from_hf(weights, sections["vit"], sections.get("text"))
    return sections, t5.ul2_from_hf(weights, hf_cfg)


def import_hf(kind: Kind, src: str | Path, out: str | Path) -> dict[str, object]:
    """HF checkpoint directory -> our safetensors file. Returns the model config sections."""
    sections, state = convert_hf(kind, src)
    metadata = {
        "format": FORMAT,
        "kind": kind,
        "model": json.dumps({k: dataclasses.asdict(v) for k, v in sections.items()}),
    }
    save_weights(state, out, metadata)
    return sections


def read_ours(path: str | Path) -> tuple[Kind, dict[str, object], StateDict]:
    """Our safetensors file -> (kind, model config sections, state dict)."""
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a pali3-train file (its safetensors metadata lacks format={FORMAT!r})"
        )
    if metadata.get("kind") not in KINDS:
        raise ValueError(
            f"{path}: a {metadata.get('kind')} file where a tower ({' or '.join(KINDS)}) one is "
            "needed"
        )
    raw = json.loads(metadata["model"])
    model = config_from_dict({"model": raw}, source=str(path)).model
    return metadata["kind"], {name: getattr(model, name) for name in raw}, load_weights(path)


def tower(kind: Kind, path: str | Path) -> tuple[dict[str, object], StateDict]:
    """(model config sections, our state dict) of a ``kind`` tower given as our file (an import,
    or a stage-0 SigLIP export) or as an HF checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return convert_hf(kind, path)
    found, sections, state = read_ours(path)
    if found != kind:
        raise ValueError(f"{path}: a {found} file where a {kind} one is needed")
    return sections, state


def export_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Our safetensors file -> an HF checkpoint directory (config.json + model.safetensors)."""
    kind, sections, state = read_ours(path)
    if kind == "siglip":
        hf_state, hf_cfg = (
            siglip.siglip_to_hf(state, sections["vit"], sections.get("text")),
            siglip.hf_config(sections["vit"], sections.get("text")),
        )
    else:
        hf_state, hf_cfg = t5.ul2_to_hf(state), t5.hf_config(sections["ul2"])
    return write_hf(hf_state, hf_cfg, out_dir)


def write_hf(hf_state: StateDict, hf_cfg: dict, out_dir: str | Path) -> Path:
    """An HF checkpoint directory as ``from_pretrained`` reads it: config.json + model.safetensors
    (metadata ``format=pt``, which transformers expects of safetensors weights)."""
    out_dir = Path(out_dir)
    save_weights(hf_state, out_dir / WEIGHTS_NAME, {"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return out_dir
