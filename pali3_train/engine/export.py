"""A training checkpoint's consolidated fp32 weights as one safetensors file.

This is what the next curriculum stage starts from (``stage.init_from``) and what gets
published: no optimizer state, no ZeRO partitioning, and metadata saying what model it is.

    python -m pali3_train.engine.export runs/stage1/checkpoints/step_00010000 stage1.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from pali3_train.cli import command_parser
from pali3_train.config import Config, config_from_dict, to_dict
from pali3_train.config.schema import VIDEO_TASKS
from pali3_train.convert.hf_checkpoint import FORMAT
from pali3_train.convert.safetensors_io import StateDict, save_weights
from pali3_train.engine.checkpoint import (
    ENGINE_TAG,
    CheckpointMeta,
    find_latest,
    read_meta,
    sizes_only,
    tokenizer_of,
    verify,
)
from pali3_train.engine.distributed import on_main_rank
from pali3_train.engine.safe_load import weights_only_loads
from pali3_train.quiet import library_chatter
from pali3_train.stages.registry import spec_for
from pali3_train.tokenizer import copy_beside

log = logging.getLogger(__name__)


def consolidated_weights(checkpoint: Path) -> tuple[CheckpointMeta, StateDict]:
    """(the checkpoint's metadata, its full fp32 state dict)."""
    verify(checkpoint)
    meta = read_meta(checkpoint)
    parallel = meta.config["parallel"]
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

    with weights_only_loads(), library_chatter():
        return meta, get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    meta, state = consolidated_weights(Path(checkpoint))
    cfg = config_from_dict(meta.config)
    tokenizer = tokenizer_of(Path(checkpoint), meta)  # the checkpoint's copy where it has one
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_path=tokenizer))
    return save_export(state, out, cfg, meta.step)


def clip_settings(cfg: Config) -> dict | None:
    """How the stage read its videos, for ``generate`` to read them the same way: None without a
    video source, else ``{"max_frames": data.max_frames, "strides": {source name: {"seconds":
    s} or {"frames": n}}}`` for each video source of ``data.sources`` (the training mixture)."""
    videos = [source for source in cfg.data.sources if source.task in VIDEO_TASKS]
    if not videos:
        return None
    strides = {
        source.name: {"seconds": source.frame_stride_s}
        if source.frame_stride_s is not None
        else {"frames": source.frame_stride_frames}
        for source in videos
    }
    return {"max_frames": cfg.data.max_frames, "strides": strides}


def save_export(state: StateDict, out: str | Path, cfg: Config, step: int) -> Path:
    """Weights with what a reader needs to use them: which model (the objective's export kind),
    its config, and a copy of the tokenizer beside them (``copy_beside``), recorded by its
    name alone, so that the folder can be moved or published as a whole. A tokenizer that is
    not there (a checkpoint exported on another machine) is recorded by its path, as before.
    A stage with video sources records how it read its clips (``clip_settings``, JSON under
    ``clips``), which ``generate`` takes as its defaults."""
    metadata = {
        "format": FORMAT,
        "kind": spec_for(cfg).export_kind,
        "model": json.dumps(to_dict(cfg.model)),
        "step": str(step),
    }
    if (clips := clip_settings(cfg)) is not None:
        metadata["clips"] = json.dumps(clips)
    if cfg.data.tokenizer_path:
        source, copy = Path(cfg.data.tokenizer_path).resolve(), copy_beside(out)
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            if source != copy.resolve():
                shutil.copyfile(source, copy)
            metadata["tokenizer"] = copy.name
        else:
            log.warning("export: tokenizer %s not found; %s records its path, no copy (pass "
                        "--tokenizer to generate)", source, out)  # fmt: skip
            metadata["tokenizer"] = str(source)
    save_weights(state, out, metadata)
    return Path(out)


def export_final(engine, cfg: Config, step: int) -> Path:
    """Collective. The final weights as ``<run_dir>/model.safetensors``, which the next stage's
    ``stage.init_from`` names. Without tensor parallelism they are consolidated from the last
    checkpoint (fp32 master weights under ZeRO); with it, the live shards are gathered over the
    TP group (the module's weights, in training precision)."""
    out = Path(cfg.run_dir) / "model.safetensors"
    if cfg.parallel.tensor_parallel_size > 1:
        state = _gather_weights(engine.module, cfg.parallel.zero_stage)
        on_main_rank(lambda: save_export(state, out, cfg, step), f"write {out}")
    else:  # consolidating a 5B checkpoint takes minutes: the others wait outside collectives

        def export_latest() -> Path:  # export() verifies the digests: finding it needs sizes
            return export(find_latest(Path(cfg.checkpoint_dir), sizes_only), out)

        on_main_rank(export_latest, f"write {out}")
    return out


def _gather_weights(module: nn.Module, zero_stage: int) -> StateDict:
    # Imported here: deepspeed picks its accelerator at import (the launcher sets it first), and
    # exporting a checkpoint by hand needs neither it nor megatron-core.
    import deepspeed

    from pali3_train.parallel import full_state_dict

    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=zero_stage == 3):
        return full_state_dict(module)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.engine.export", __doc__)
    parser.add_argument("checkpoint", help="a step_NNNNNNNN folder")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = export(args.checkpoint, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
