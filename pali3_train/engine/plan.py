"""What a run would do, worked out without starting it (``launcher/run.py --dry-run``).

No process group, no GPU, no weights: the world size is a number, the stage's model is built on
the meta device (as ``pali3_train.params`` does) and measured there, and the checks are the ones a
real start runs (``check_layout``, ``check_data``, ``check_resume``). The memory figures are
estimates for one device:

Model states. P = parameters held by one tensor-parallel (TP) rank (layers in
``parallel.TP_PLAN`` hold 1/t of their weights), T = those of them that train, L = the largest
single layer on the rank, N = data-parallel (DP) size, w = 2 bytes (bf16) or 4 (fp32)::

    weights     w*P        / N under ZeRO-3 (frozen ones too; parameters under ZeRO-3's
                           persistence threshold stay whole on every rank)
    gradients   w*T        / N under ZeRO-2 and 3
    optimizer   16*T       / N under ZeRO-1, 2 and 3: fp32 master copy, fp32 gradient, Adam m, v
                           (without ZeRO in fp32, torch's AdamW keeps m and v only: 8*T)
    gathered    2*w*L      ZeRO-3 only: one layer's weights and gradients gathered whole
                           (DeepSpeed's assumption; prefetching can hold a few layers more)

For a bf16 model that trains everything without TP this is DeepSpeed's own estimate
(``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_...`` in deepspeed.runtime.zero,
no offload), except that ZeRO-3's 16-bit gradient partition (w*T/N), which DeepSpeed 0.19.8
allocates (``grad_partitions_flat_buffer``) but its estimator leaves out, is counted here.

Activations of one micro-batch (b samples; a block of width h over s tokens; t = TP size), after
Korthikanti et al. 2022 (arXiv 2205.05198: a layer's activations under tensor parallelism without
sequence parallelism) less the attention-score term, which the fused kernels of
``scaled_dot_product_attention`` do not keep: s*b*h*(10 + 24/t) bytes per block at
16 bit (twice that in fp32). With activation checkpointing a block keeps only its input, w*s*b*h,
and one block at a time is recomputed whole. A tower that trains nothing and receives no gradient
(the frozen ViT of stage 1) keeps nothing. Added whole: UL2's encoder attention bias
[b, heads/t, s, s], the decoder's cross-attention keys and values of every layer, and the logits
(w + 4 bytes, the loss works in fp32). Real use also has allocator fragmentation, communication
buffers and the CUDA context (~1 GiB): keep a margin.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from data_pipeline.loader import resolve_sources
from pali3_train.config import Config, ConfigError
from pali3_train.engine.checkpoint import CheckpointError, resolve
from pali3_train.engine.deepspeed_config import accumulation_steps, deepspeed_config
from pali3_train.engine.optim import freeze
from pali3_train.models import PaLI3, SigLIP
from pali3_train.params import count
from pali3_train.tokenizer import Tokenizer

GiB = 2**30
BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZER_BYTES = 16  # fp32 master weights + fp32 gradients + Adam's two moments, per parameter


# ------------------------------------------------------------------------------------ checks


def check_layout(cfg: Config, stage: str, world_size: int, where: str) -> int:
    """What needs only the config and the world size; returns the accumulation steps."""
    tp = cfg.parallel.tensor_parallel_size
    if world_size % tp:
        raise ConfigError(
            where,
            "parallel.tensor_parallel_size",
            f"{tp} does not divide the world size {world_size}",
        )
    if stage == "0" and cfg.data.max_target_tokens > cfg.model.text.max_len:
        raise ConfigError(
            where,
            "data.max_target_tokens",
            f"{cfg.data.max_target_tokens} exceeds the text tower's "
            f"model.text.max_len={cfg.model.text.max_len} (stage 0 encodes targets)",
        )
    return accumulation_steps(cfg, world_size // tp, where)


def check_data(cfg: Config, where: str) -> str:
    """The data sources, eval sources and tokenizer exist and fit; returns a summary."""
    sources = resolve_sources(cfg.data, where)
    if cfg.eval.sources:
        resolve_sources(replace(cfg.data, sources=cfg.eval.sources), where, "eval.sources")
    vocab = Tokenizer.load(cfg.data.tokenizer_path).vocab_size
    if vocab > cfg.model.ul2.vocab_size:
        raise ConfigError(
            where,
            "model.ul2.vocab_size",
            f"{cfg.model.ul2.vocab_size} is smaller than the tokenizer's {vocab}",
        )
    evals = f" (+{len(cfg.eval.sources)} eval)" if cfg.eval.sources else ""
    return f"{len(sources)} sources{evals}, tokenizer {vocab:,} pieces"


def check_resume(cfg: Config, resume: str) -> Path | None:
    """``--resume``: the checkpoint a start would load (None: a fresh start)."""
    try:
        return resolve(resume, Path(cfg.checkpoint_dir))
    except CheckpointError as exc:
        raise ConfigError("--resume", "", str(exc)) from None


# ------------------------------------------------------------------------------ model states


class ModelStates(NamedTuple):
    """Bytes per device; see the module docstring for the accounting."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float

    @property
    def total(self) -> float:
        return sum(self)


def model_states(
    params: int,
    trainable: int,
    largest_layer: int,
    dp: int,
    zero_stage: int,
    precision: str,
    persistent: int = 0,
) -> ModelStates:
    """Per-device bytes of weights, gradients and AdamW state for ``params`` parameters on one
    TP rank (``trainable`` of them train), ``dp`` data-parallel ranks, a ZeRO stage and the
    model precision. ``persistent``: parameters that ZeRO-3 leaves whole on every rank."""
    w = BYTES[precision]
    weights = w * (persistent + (params - persistent) / dp) if zero_stage == 3 else w * params
    gradients = w * trainable / (dp if zero_stage >= 2 else 1)
    per_param = 8 if zero_stage == 0 and precision == "fp32" else OPTIMIZER_BYTES
    optimizer = per_param * trainable / (dp if zero_stage >= 1 else 1)
    gathered = 2 * w * largest_layer if zero_stage == 3 else 0
    return ModelStates(weights, gradients, optimizer, gathered)


# ---------------------------------------------------------------------------- the stage's model


class Count(NamedTuple):
    name: str
    total: int
    trainable: int


@dataclass(frozen=True)
class RankParams:
    """What one tensor-parallel rank holds."""

    params: int
    trainable: int
    largest_layer: int
    persistent: int  # parameters below ZeRO-3's persistence threshold


def stage_model(cfg: Config, stage: str, where: str) -> nn.Module:
    """The stage's model on the meta device (no memory), with ``stage.freeze`` applied."""
    with torch.device("meta"):
        model = SigLIP(cfg.model) if stage == "0" else PaLI3(cfg.model)
    try:
        freeze(model, cfg.stage.freeze)
    except ValueError as exc:
        raise ConfigError(where, "stage.freeze", str(exc).removeprefix("stage.freeze: ")) from None
    return model


def module_counts(model: nn.Module) -> list[Count]:
    """Total and trainable parameters per top-level module; the model's own parameters (SigLIP's
    temperature and bias) as one row, "other"."""
    rows = [
        Count(name, count(child), sum(p.numel() for p in child.parameters() if p.requires_grad))
        for name, child in model.named_children()
        if count(child)
    ]
    own = dict(model.named_parameters(recurse=False))
    if own:
        total = sum(p.numel() for p in own.values())
        rows.append(Count("other", total, sum(p.numel() for p in own.values() if p.requires_grad)))
    return rows


def local_numels(model: nn.Module, tp: int, where: str = "config") -> dict[int, int]:
    """id(parameter) -> its elements on one TP rank, following ``TP_PLAN`` like ``parallelize``:
    column-parallel weights and biases, row-parallel weights, vocabulary and head embeddings are
    split in t; everything else is replicated."""
    local = {id(p): p.numel() for p in model.parameters()}
    if tp == 1:
        return local
    with warnings.catch_warnings():  # megatron-core warns that Apex/TransformerEngine are absent
        warnings.simplefilter("ignore")
        from pali3_train.parallel.tensor_parallel import Shard, _check_divisible, _plan_targets
    for path, owner, name, shard in _plan_targets(model):
        child = getattr(owner, name)
        try:
            _check_divisible(path, owner, child, shard, tp)
        except ValueError as exc:
            raise ConfigError(where, "parallel.tensor_parallel_size", str(exc)) from None
        split = [child.weight]
        if shard is Shard.COLUMN and child.bias is not None:
            split.append(child.bias)
        for p in split:
            local[id(p)] = p.numel() // tp
    return local


def rank_params(model: nn.Module, tp: int, persistence_threshold: float, where: str) -> RankParams:
    """Parameters one TP rank holds; the largest layer counts a module's own parameters, as
    DeepSpeed's ``model_to_params`` does; ``persistent`` those under the ZeRO-3 threshold."""
    local = local_numels(model, tp, where)
    params = list(model.parameters())
    largest = max(sum(local[id(p)] for p in m.parameters(recurse=False)) for m in model.modules())
    return RankParams(
        params=sum(local[id(p)] for p in params),
        trainable=sum(local[id(p)] for p in params if p.requires_grad),
        largest_layer=largest,
        persistent=sum(local[id(p)] for p in params if local[id(p)] < persistence_threshold),
    )


# ------------------------------------------------------------------------------- activations


class Tower(NamedTuple):
    """A stack of blocks and what it keeps for the backward pass, in bytes per device."""

    name: str
    blocks: int
    seq: int
    width: int
    plain: float  # without activation checkpointing: every block's activations, plus extras
    checkpointed: float  # block inputs only, plus extras
    largest_block: float  # what checkpointing recomputes at once (0: keeps nothing)


@dataclass(frozen=True)
class Activations:
    towers: tuple[Tower, ...]
    logits: float

    @property
    def recompute(self) -> float:
        return max((t.largest_block for t in self.towers), default=0.0)

    def total(self, checkpointing: bool) -> float:
        if checkpointing:
            return sum(t.checkpointed for t in self.towers) + self.recompute + self.logits
        return sum(t.plain for t in self.towers) + self.logits


def _trains(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def activations(cfg: Config, stage: str, model: nn.Module) -> Activations:
    """The estimate of the module docstring for one micro-batch of the stage's model."""
    b, t = cfg.train.micro_batch_size, cfg.parallel.tensor_parallel_size
    w = BYTES[cfg.train.precision]

    def tower(name: str, blocks: int, seq: int, width: int, keeps: bool, extra=0.0) -> Tower:
        if not keeps:
            return Tower(name, blocks, seq, width, 0.0, 0.0, 0.0)
        block = seq * b * width * (10 + 24 / t) * w / 2
        inputs = w * seq * b * width
        return Tower(
            name, blocks, seq, width, blocks * block + extra, blocks * inputs + extra, block
        )

    vit, target = cfg.model.vit, cfg.data.max_target_tokens
    if stage == "0":
        text = cfg.model.text
        image_keeps = _trains(model.image, model.image_head)
        return Activations(
            (
                tower("image tower", vit.depth, vit.num_patches, vit.width, image_keeps),
                tower("text tower", text.depth, target, text.width, _trains(model.text)),
            ),
            logits=0.0,
        )
    ul2 = cfg.model.ul2
    seq = vit.num_patches + cfg.data.max_prompt_tokens
    # A tower keeps activations if it trains or a gradient must pass through it to one that does.
    vit_keeps = _trains(model.vit)
    enc_keeps = vit_keeps or _trains(model.projection, model.ul2.embed, model.ul2.encoder_layers)
    dec_keeps = enc_keeps or _trains(model.ul2.decoder_layers, model.ul2.lm_head)
    bias = b * (ul2.num_heads // t) * seq**2 * w  # [b, heads/t, s, s], shared by all layers
    cross_kv = ul2.num_decoder_layers * 2 * b * seq * ul2.num_heads * ul2.d_kv / t * w
    return Activations(
        (
            tower("vit", vit.depth, vit.num_patches, vit.width, vit_keeps),
            tower("ul2 encoder", ul2.num_encoder_layers, seq, ul2.d_model, enc_keeps, bias),
            tower("ul2 decoder", ul2.num_decoder_layers, target, ul2.d_model, dec_keeps, cross_kv),
        ),
        logits=b * target * ul2.vocab_size / t * (w + 4) if dec_keeps else 0.0,
    )


# --------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    cfg: Config
    stage: str
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

    @property
    def tokens_per_sample(self) -> dict[str, int]:
        data, image = self.cfg.data, self.cfg.model.vit.num_patches
        if self.stage == "0":
            return {"image": image, "text": data.max_target_tokens}
        return {"image": image, "prompt": data.max_prompt_tokens, "target": data.max_target_tokens}

    @property
    def activation_bytes(self) -> float:
        return self.activations.total(self.cfg.parallel.activation_checkpointing)


def build_plan(
    cfg: Config,
    stage: str,
    world_size: int,
    gpus_per_node: int = 8,
    where: str = "config",
    model: nn.Module | None = None,
) -> Plan:
    """Everything a dry run prints; raises ConfigError for a layout a real start would refuse.
    ``model``: ``stage_model(cfg, stage)`` built already, for a caller that plans many layouts of
    one model (``cluster.plan``); only ``cfg.train`` and ``cfg.parallel`` may differ."""
    accumulation = check_layout(cfg, stage, world_size, where)
    tp = cfg.parallel.tensor_parallel_size
    dp = world_size // tp
    model = stage_model(cfg, stage, where) if model is None else model
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
        stage,
        where,
        world_size,
        tp,
        dp,
        gpus_per_node,
        accumulation,
        tuple(module_counts(model)),
        rank,
        states,
        activations(cfg, stage, model),
    )


def _size(n: float) -> str:
    return f"{n / GiB:7.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:7.1f} MiB"


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


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
    pairs = train.micro_batch_size * dp
    contrastive = f"            the sigmoid loss sees micro x DP = {pairs:,} pairs per micro-step"
    init = cfg.stage.init_from
    missing = "" if init is None or Path(init).is_file() else " (not there yet)"
    frozen = ", ".join(cfg.stage.freeze) or "nothing"
    lines = [
        f"dry run of stage {plan.stage}: {plan.config} (nothing started)",
        f"layout      world {world} = TP {tp} x DP {dp}; {nodes}",
        f"batch       global {train.global_batch_size:,} = micro {train.micro_batch_size} x "
        f"accumulation {plan.accumulation} x DP {dp}",
        *([contrastive] if plan.stage == "0" else []),
        "tokens      "
        + " + ".join(f"{n:,} {k}" for k, n in tokens.items())
        + f" = {per_sample:,} per sample ({cfg.model.vit.image_size_px} px); "
        f"{per_sample * train.global_batch_size:,} per step",
        f"training    {train.steps:,} steps, {train.precision}, ZeRO-{par.zero_stage}, "
        f"activation checkpointing {'on' if par.activation_checkpointing else 'off'}, "
        f"frozen: {frozen}",
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
        "memory per device (estimate; how: pali3_train/engine/plan.py)",
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
        lines.append(f"    {'logits':<12}{_size(a.logits)}  fp32 loss over the vocabulary/{tp}")
    lines += [
        "    per block s*b*h*(10+24/t) B at 16 bit (Korthikanti et al. 2022 without attention",
        "    scores); checkpointed w*s*b*h; plus attention bias, cross-attention K/V, logits",
        f"  = total     {_size(s.total + plan.activation_bytes)}  "
        "+ allocator, buffers, CUDA context: keep a margin",
        f"data        {data}",
        f"resume      {resume}",
    ]
    return "\n".join(lines)


def dry_run(
    cfg: Config, stage: str, where: str, resume: str, world_size: int, gpus_per_node: int = 8
) -> int:
    """Print the plan; 0 if a real start would pass every check, 2 (with the reason) if not.
    A layout that cannot be planned fails at once (stderr); data and resume problems are lines
    of the plan."""
    try:
        plan = build_plan(cfg, stage, world_size, gpus_per_node, where)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = True
    try:
        data = f"OK, {check_data(cfg, where)}"
    except ConfigError as exc:
        data, ok = f"error: {exc}", False
    try:
        found = check_resume(cfg, resume)
        resume_line = f"{resume}: " + (
            f"from {found}" if found else f"fresh start (none under {cfg.checkpoint_dir})"
        )
    except ConfigError as exc:
        resume_line, ok = f"error: {exc}", False
    print(format_plan(plan, data, resume_line))
    return 0 if ok else 2
