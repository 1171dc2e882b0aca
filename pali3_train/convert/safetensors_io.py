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


# safetensors' dtype names -> torch's
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def weight_files(path: str | Path) -> list[Path]:
    """The files behind a ``.safetensors`` file, or a directory holding ``model.safetensors``
    or a sharded checkpoint (``model.safetensors.index.json``), as published on the hub."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            index = json.loads((path / INDEX_NAME).read_text())
            return [path / shard for shard in sorted(set(index["weight_map"].values()))]
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no safetensors weights here (expected a .safetensors "
            f"file, or a directory with {WEIGHTS_NAME} or {INDEX_NAME})"
        )
    return [path]


def load_weights(path: str | Path) -> StateDict:
    """Every tensor of ``path`` (see ``weight_files``) in memory at once."""
    state: StateDict = {}
    for file in weight_files(path):
        state.update(load_file(file))
    return state


class WeightReader:
    """The tensors of ``path`` (see ``weight_files``) one at a time, for models too large to
    hold twice: ``shapes`` costs no tensor memory, and ``read`` maps a file only while it copies
    one tensor out, so the reader never keeps more than that tensor."""

    def __init__(self, path: str | Path):
        self.files: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self._shapes: StateDict = {}
        for file in weight_files(path):
            with safe_open(str(file), framework="pt") as f:
                self.metadata = self.metadata or f.metadata() or {}
                for name in f.keys():
                    part = f.get_slice(name)
                    self.files[name] = file
                    self._shapes[name] = torch.empty(
                        part.get_shape(), dtype=DTYPES[part.get_dtype()], device="meta"
                    )

    def shapes(self) -> StateDict:
        """name -> a meta tensor of the stored shape and dtype (no data)."""
        return dict(self._shapes)

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


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
