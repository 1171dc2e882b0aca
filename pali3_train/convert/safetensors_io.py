"""Reading and writing weights as safetensors only: no pickle ever touches a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def load_weights(path: str | Path) -> StateDict:
    """A ``.safetensors`` file, or a directory holding ``model.safetensors`` or a sharded
    checkpoint (``model.safetensors.index.json``), as published on the HuggingFace hub."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            index = json.loads((path / INDEX_NAME).read_text())
            state: StateDict = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(path / shard))
            return state
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no safetensors weights here (expected a .safetensors "
            f"file, or a directory with {WEIGHTS_NAME} or {INDEX_NAME})"
        )
    return load_file(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def save_weights(
    state: StateDict, path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Tensors are made contiguous and un-shared, which safetensors requires."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in state.items()}, path, metadata=metadata
    )
