"""Everything a start can refuse before any process group exists, each refusal one
``ConfigError`` naming the file and the field: the layout and batch split, the objective's own
rules (``StageSpec.check``), ``--stage`` against the config, the kernels on this machine, the
data, the tokenizer, the ``--resume`` checkpoint, a fresh start over a previous run, the
``init_from`` weights and the ``stage.freeze`` module names (the model built on the meta device).
``launcher/run.py`` runs them on every start, ``--dry-run`` prints what they found,
``cluster.submit`` runs the layout checks for the job's world size.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pali3_train.config import Config, ConfigError
from pali3_train.config.schema import FieldError
from pali3_train.data_pipeline.loader import resolve_sources
from pali3_train.data_pipeline.probe import probe_sources
from pali3_train.engine.checkpoint import CheckpointError, read_meta, resolve, sizes_only
from pali3_train.engine.deepspeed_config import accumulation_steps
from pali3_train.engine.previous_run import previous_run
from pali3_train.kernels import resolve_kernels
from pali3_train.stages.curriculum import CURRICULUM
from pali3_train.stages.registry import spec_for, stage_model
from pali3_train.tokenizer import Tokenizer


def check_layout(
    cfg: Config, world_size: int, where: str, training: bool = True
) -> tuple[int, list[str]]:
    """What needs only the config and the world size: (accumulation steps, warnings about
    settings the objective ignores). ``training``: false for an evaluation, which takes no
    optimizer step and so no accumulation."""
    tp = cfg.parallel.tensor_parallel_size
    if world_size % tp:
        raise ConfigError(
            where,
            "parallel.tensor_parallel_size",
            f"{tp} does not divide the world size {world_size}",
        )
    spec = spec_for(cfg)
    warnings = list(spec.check(cfg, where))
    accumulation = accumulation_steps(cfg, world_size // tp, where)
    if training and accumulation > 1 and not spec.accumulates:
        micro, dp, total = cfg.train.micro_batch_size, world_size // tp, cfg.train.global_batch_size
        raise ConfigError(
            where,
            "train.micro_batch_size",
            f"{micro} x accumulation {accumulation} x DP {dp}: the {spec.objective} objective "
            f"needs the whole batch in one micro-step (its loss would see {micro * dp:,} pairs "
            f"at a time, not {total:,}); set micro_batch_size to global / DP = {total // dp}",
            also=("train.global_batch_size", "parallel.tensor_parallel_size"),
        )
    return accumulation, warnings


def check_stage_flag(cfg: Config, stage: str | None, where: str) -> Config:
    """``--stage S`` must agree with the config: S's objective, and S itself if the config names
    its stage. Returns the config with its stage named (tags, titles, checkpoint metadata)."""
    if stage is None:
        return cfg
    named, objective = cfg.stage.name, CURRICULUM[stage].objective
    if named is not None and named != stage:
        raise ConfigError(where, "stage.name", f"is {named!r}, but --stage {stage} was given")
    if objective != cfg.stage.objective:
        raise ConfigError(
            where,
            "stage.objective",
            f"is {cfg.stage.objective!r}, but --stage {stage} trains the {objective} objective",
        )
    return replace(cfg, stage=replace(cfg.stage, name=stage))


def check_data(cfg: Config, where: str, remote: bool = False) -> str:
    """The data sources, eval sources and tokenizer exist and fit, and each source's first
    samples can be read as its ``format`` says (remote shards too if ``remote``: the dry run);
    returns a summary."""
    image_size_px = cfg.model.vit.image_size_px
    sources = resolve_sources(cfg.data, where)
    probe_sources(sources, image_size_px, where, remote=remote)
    if cfg.eval.sources:
        evals = resolve_sources(replace(cfg.data, sources=cfg.eval.sources), where, "eval.sources")
        probe_sources(evals, image_size_px, where, "eval.sources", remote)
    try:
        vocab = Tokenizer.load(cfg.data.tokenizer_path).vocab_size
    except (OSError, ValueError) as exc:  # missing, unreadable, not a SentencePiece model
        raise ConfigError(where, "data.tokenizer_path", str(exc)) from None
    if vocab > cfg.model.ul2.vocab_size:
        raise ConfigError(
            where,
            "model.ul2.vocab_size",
            f"{cfg.model.ul2.vocab_size} is smaller than the tokenizer's {vocab}",
            also=("data.tokenizer_path",),
        )
    evals = f" (+{len(cfg.eval.sources)} eval)" if cfg.eval.sources else ""
    return f"{len(sources)} sources{evals}, tokenizer {vocab:,} pieces"


def check_resume(cfg: Config, resume: str) -> Path | None:
    """``--resume``: the checkpoint a start would load (None: a fresh start), by the files'
    presence and sizes; their checksums are verified once the ranks share the work."""
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError(f"--resume {resume}", "", "no such checkpoint folder")
    try:
        found = resolve(resume, Path(cfg.checkpoint_dir), sizes_only)
        if found is not None:
            read_meta(found)
        return found
    except CheckpointError as exc:
        raise ConfigError("--resume", "", str(exc)) from None


def check_init_from(cfg: Config, where: str) -> None:
    init = cfg.stage.init_from
    if init and not Path(init).is_file():
        missing = f"{init} does not exist: run the previous stage first"
        raise ConfigError(where, "stage.init_from", missing)


def check_freeze(cfg: Config, where: str, training: bool = True) -> None:
    """``stage.freeze`` names modules or parameters of the stage's model (built on the meta
    device: no memory, well under a second for the tiny model), and a training run keeps some
    parameter trainable."""
    model = stage_model(cfg, where)
    if training and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(where, "stage.freeze", "leaves no trainable parameter")


def check_fresh_start(cfg: Config, where: str, resume: str, overwrite: bool) -> list[str]:
    """``--resume none`` where a run already trained mixes two runs (``engine.previous_run``):
    refused unless ``overwrite``; returns what an overwrite will move aside (empty: nothing)."""
    found = previous_run(cfg) if resume == "none" else []
    if found and not overwrite:
        raise ConfigError(
            where,
            "run_dir",
            f"{cfg.run_dir} already holds a run ({', '.join(found)}); --resume none starts over "
            "only with --overwrite (which moves that run aside), else resume it "
            "(--resume auto) or choose another run_dir",
        )
    return found


def check_kernels(cfg: Config, where: str, training: bool = True) -> None:
    """The ``kernels:`` choices resolve on this machine's device (the one its ranks will use)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_kernels(cfg.kernels, device, cfg.parallel, training)
    except FieldError as exc:
        raise ConfigError(where, exc.field_path, exc.message) from None


def check_before_start(
    cfg: Config,
    world_size: int,
    where: str,
    resume: str,
    training: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Every check a real start runs after ``check_stage_flag``, in the order a user would fix
    them; returns the objective's warnings about settings it ignores. ``overwrite``:
    ``--overwrite``, which lets ``--resume none`` replace a previous run."""
    _, warnings = check_layout(cfg, world_size, where, training)
    check_kernels(cfg, where, training)
    check_data(cfg, where)
    check_resume(cfg, resume)
    if training:
        check_fresh_start(cfg, where, resume, overwrite)
    check_init_from(cfg, where)
    check_freeze(cfg, where, training)  # last: it builds the model (on the meta device)
    return warnings
