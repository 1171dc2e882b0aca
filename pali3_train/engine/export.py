"""A training checkpoint's consolidated fp32 weights as one safetensors file.

This is what the next curriculum stage starts from (``stage.init_from``) and what gets
published: no optimizer state, no ZeRO partitioning, and metadata saying what model it is.

    python -m pali3_train.engine.export runs/stage1/checkpoints/step_00010000 stage1.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pali3_train.convert.hf_checkpoint import FORMAT
from pali3_train.convert.safetensors_io import StateDict, save_weights
from pali3_train.engine.checkpoint import ENGINE_TAG, verify

KIND_OF_STAGE = {"0": "siglip", "1": "pali3", "2": "pali3", "transfer": "pali3"}


def consolidated_weights(checkpoint: Path) -> tuple[dict, StateDict]:
    """(meta.json of the checkpoint, its full fp32 state dict)."""
    verify(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    parallel = meta["config"]["parallel"]
    if parallel["tensor_parallel_size"] > 1:
        raise ValueError(
            f"{checkpoint}: exporting tensor-parallel checkpoints is not supported yet; resume it "
            "with parallel.tensor_parallel_size=1 (its data-parallel size may change) and export"
        )
    if parallel["zero_stage"] == 0:  # every rank holds the whole model: read rank 0's copy
        states = checkpoint / ENGINE_TAG / "mp_rank_00_model_states.pt"
        state = torch.load(states, map_location="cpu", weights_only=True)["module"]
        return meta, {k: v.float() for k, v in state.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return meta, get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    meta, state = consolidated_weights(Path(checkpoint))
    return save_export(state, out, meta["stage"], meta["config"], meta["step"])


def save_export(state: StateDict, out: str | Path, stage: str, config: dict, step: int) -> Path:
    """Weights with what a reader needs to use them: which model, its config, the tokenizer."""
    metadata = {
        "format": FORMAT,
        "kind": KIND_OF_STAGE[stage],
        "model": json.dumps(config["model"]),
        "step": str(step),
    }
    if config["data"]["tokenizer_path"]:
        metadata["tokenizer"] = str(Path(config["data"]["tokenizer_path"]).resolve())
    save_weights(state, out, metadata)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step_NNNNNNNN folder")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
