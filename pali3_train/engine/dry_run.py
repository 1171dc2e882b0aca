"""What a run would do, worked out without starting it (``launcher/run.py --dry-run``).

No process group, no GPU, no weights: the world size is a number, the stage's model is built on
the meta device and measured there (``engine.memory`` for the bytes per device), and the checks
are the ones a real start runs (``engine.checks``). ``cluster.plan`` builds the same ``Plan`` for
every layout it considers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pali3_train.config import Config, ConfigError
from pali3_train.engine.checks import check_data, check_fresh_start, check_layout, check_resume
from pali3_train.engine.deepspeed_config import deepspeed_config
from pali3_train.engine.flops import SampleFlops
from pali3_train.engine.memory import (
    BYTES,
    LOSS_PATHS,
    Activations,
    Count,
    GiB,
    ModelStates,
    RankParams,
    model_states,
    module_counts,
    rank_params,
)
from pali3_train.stages.registry import spec_for, stage_model

# --------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    cfg: Config
    config: str
    world_size: int
    tp: int
    dp: int
    gpus_per_node: int
    accumulation: int
    modules: tuple[Count, ...]
    rank: RankParams
    states: ModelStates
    activations: Activations
    warnings: tuple[str, ...]  # settings the objective ignores

    @property
    def tokens_per_sample(self) -> dict[str, int]:
        return spec_for(self.cfg).tokens_per_sample(self.cfg)

    @property
    def flops(self) -> SampleFlops:
        return spec_for(self.cfg).flops(self.cfg)

    @property
    def activation_bytes(self) -> float:
        return self.activations.total(self.cfg.parallel.activation_checkpointing)


def build_plan(
    cfg: Config,
    world_size: int,
    gpus_per_node: int = 8,
    where: str = "config",
    model: nn.Module | None = None,
) -> Plan:
    """Everything a dry run prints; raises ConfigError for a layout a real start would refuse.
    ``model``: ``stage_model(cfg)`` built already, for a caller that plans many layouts of one
    model (``cluster.plan``); only ``cfg.train`` and ``cfg.parallel`` may differ."""
    accumulation, warnings = check_layout(cfg, world_size, where)
    tp = cfg.parallel.tensor_parallel_size
    dp = world_size // tp
    model = stage_model(cfg, where) if model is None else model
    zero = deepspeed_config(cfg, dp)["zero_optimization"]
    rank = rank_params(model, tp, zero.get("stage3_param_persistence_threshold", 0), where)
    states = model_states(
        rank.params,
        rank.trainable,
        rank.largest_layer,
        dp,
        cfg.parallel.zero_stage,
        cfg.train.precision,
        rank.persistent,
    )
    return Plan(
        cfg,
        where,
        world_size,
        tp,
        dp,
        gpus_per_node,
        accumulation,
        tuple(module_counts(model)),
        rank,
        states,
        spec_for(cfg).activations(cfg, model),
        tuple(warnings),
    )


def _stage_title(cfg: Config) -> str:
    named = f"stage {cfg.stage.name}, " if cfg.stage.name else ""
    return f"{named}{cfg.stage.objective} objective"


def _size(n: float) -> str:
    return f"{n / GiB:7.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:7.1f} MiB"


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def _flop(n: float) -> str:
    scale, unit = (1e12, "T") if n >= 1e12 else (1e9, "G") if n >= 1e9 else (1e6, "M")
    return f"{n / scale:,.2f} {unit}FLOP"


def format_plan(plan: Plan, data: str, resume: str) -> str:
    """The plan as text of about 30-40 lines."""
    cfg, tp, dp, world, g = plan.cfg, plan.tp, plan.dp, plan.world_size, plan.gpus_per_node
    train, par = cfg.train, cfg.parallel
    if world <= g:
        nodes = "1 node"
    elif world % g == 0:
        nodes = f"{world // g} nodes x {g}, TP groups {'inside' if g % tp == 0 else 'across'} nodes"
    else:
        nodes = f"not a whole number of {g}-device nodes"
    tokens = plan.tokens_per_sample
    per_sample = sum(tokens.values())
    px, frames = cfg.model.vit.image_size_px, tokens.get("image", 0) // cfg.model.vit.num_patches
    pixels = f"{frames} frames at {px} px" if frames > 1 else f"{px} px"  # a clip, or an image
    pairs = train.micro_batch_size * dp
    whole_batch = (
        f"            the {cfg.stage.objective} loss sees micro x DP = {pairs:,} pairs "
        "per micro-step"
    )
    init = cfg.stage.init_from
    missing = "" if init is None or Path(init).is_file() else " (not there yet)"
    frozen = ", ".join(cfg.stage.freeze) or "nothing"
    flops = plan.flops
    lines = [
        f"dry run of {_stage_title(cfg)}: {plan.config} (nothing started)",
        f"layout      world {world} = TP {tp} x DP {dp}; {nodes}",
        f"batch       global {train.global_batch_size:,} = micro {train.micro_batch_size} x "
        f"accumulation {plan.accumulation} x DP {dp}",
        *([] if spec_for(cfg).accumulates else [whole_batch]),
        "tokens      "
        + " + ".join(f"{n:,} {k}" for k, n in tokens.items())
        + f" = {per_sample:,} per sample ({pixels}); "
        f"{per_sample * train.global_batch_size:,} per step",
        f"training    {train.steps:,} steps, {train.precision}, ZeRO-{par.zero_stage}, "
        f"activation checkpointing {'on' if par.activation_checkpointing else 'off'}, "
        f"frozen: {frozen}",
        f"flops       {_flop(flops.model)} per sample, forward + backward: model FLOPs (MFU's)",
        f"            {_flop(flops.hardware(True))} "
        + ("executed" if par.activation_checkpointing else "if checkpointing were on")
        + ", with its recompute: hardware FLOPs (HFU's; engine/flops.py)",
        f"init from   {init}{missing}" if init else "init from   nothing (stage.init_from: null)",
        f"parameters  {'total':>16}{'trainable':>16}{'frozen':>16}",
    ]
    total = Count(
        "total", sum(m.total for m in plan.modules), sum(m.trainable for m in plan.modules)
    )
    for row in (*plan.modules, total):
        frozen_count = row.total - row.trainable
        lines.append(f"  {row.name:<10}{row.total:>16,}{row.trainable:>16,}{frozen_count:>16,}")
    r, s, w, z = plan.rank, plan.states, BYTES[train.precision], par.zero_stage
    shard = f" / DP {dp}"
    optimizer = "8 B (m, v)" if z == 0 and train.precision == "fp32" else "16 B (fp32 master,"
    optimizer += "" if z == 0 and train.precision == "fp32" else " grad, m, v)"
    lines += [
        f"per device  {r.params:,} parameters, {r.trainable:,} trainable"
        + (f" (1/{tp} of TP-sharded layers)" if tp > 1 else ""),
        "memory per device (estimate; how: pali3_train/engine/memory.py)",
        f"  weights     {_size(s.weights)}  {w} B x {_m(r.params)}"
        + (f"{shard}, {_m(r.persistent)} whole (ZeRO-3 persistence)" if z == 3 else ""),
        f"  gradients   {_size(s.gradients)}  {w} B x {_m(r.trainable)} trainable"
        + (shard if z >= 2 else ""),
        f"  optimizer   {_size(s.optimizer)}  {optimizer} x {_m(r.trainable)}"
        + (shard if z >= 1 else ""),
    ]
    if z == 3:
        lines.append(
            f"  gathered    {_size(s.gathered)}  one layer whole: 2 x {w} B x {_m(r.largest_layer)}"
        )
    a, on = plan.activations, par.activation_checkpointing
    lines += [
        f"  = states    {_size(s.total)}",
        f"  activations {_size(plan.activation_bytes)}  one micro-batch of {train.micro_batch_size}"
        f", checkpointing {'on' if on else 'off'} (if {'off' if on else 'on'}: "
        f"{_size(a.total(not on)).strip()})",
    ]
    for x in a.towers:
        what = f"{x.blocks} blocks, s={x.seq:,}, h={x.width}"
        if not x.largest_block:
            lines.append(f"    {x.name:<12}{'':>11}  {what}: trains nothing, keeps nothing")
        else:
            lines.append(f"    {x.name:<12}{_size(x.checkpointed if on else x.plain)}  {what}")
    if on and a.recompute:
        lines.append(f"    {'recompute':<12}{_size(a.recompute)}  the largest block, once")
    if a.logits:
        lines.append(
            f"    {'logits':<12}{_size(a.logits)}  token cross-entropy over the vocabulary/{tp}: "
            f"{LOSS_PATHS[a.loss_path].format(chunk=cfg.kernels.cross_entropy_chunk_tokens)}"
        )
    lines += [
        "    per block s*b*h*(10+24/t) B at 16 bit (Korthikanti et al. 2022 without attention",
        "    scores); checkpointed w*s*b*h; plus attention bias, cross-attention K/V, logits",
        f"  = total     {_size(s.total + plan.activation_bytes)}  "
        "+ allocator, buffers, CUDA context: keep a margin",
        *(f"warning     {w}" for w in plan.warnings),
        f"data        {data}",
        f"resume      {resume}",
    ]
    return "\n".join(lines)


def dry_run(
    cfg: Config,
    where: str,
    resume: str,
    world_size: int,
    gpus_per_node: int = 8,
    overwrite: bool = False,
) -> int:
    """Print the plan; 0 if a real start would pass every check, 2 (with the reason) if not.
    A layout that cannot be planned fails at once (stderr); data and resume problems (a fresh
    start over a previous run without ``overwrite`` among them) are lines of the plan."""
    try:
        plan = build_plan(cfg, world_size, gpus_per_node, where)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = True
    try:
        data = f"OK, {check_data(cfg, where, remote=True)}"
    except ConfigError as exc:
        data, ok = f"error: {exc}", False
    try:
        found = check_resume(cfg, resume)
        resume_line = f"{resume}: " + (
            f"from {found}"
            if found
            else "fresh start" + ("" if resume == "none" else f" (none under {cfg.checkpoint_dir})")
        )
        replaced = check_fresh_start(cfg, where, resume, overwrite)
        if replaced:
            resume_line += f"; --overwrite moves the previous run aside: {', '.join(replaced)}"
    except ConfigError as exc:
        resume_line, ok = f"error: {exc}", False
    print(format_plan(plan, data, resume_line))
    return 0 if ok else 2
