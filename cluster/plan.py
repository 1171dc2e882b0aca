"""Capacity planner: the fastest layout to train a stage with that fits a cluster's GPUs.

    python -m pali3_train.cluster.plan --model configs/models/pali3_5b.yaml --world-size 64 \\
        --gpu-memory 80
    python -m pali3_train.cluster.plan --config configs/pali3_5b/stage2_812.yaml --stage 2 \\
        --world-size 256 --gpu-memory 80 --global-batch 1024

Layouts tried: tensor parallelism (TP) over the divisors of --gpus-per-node that the model splits
evenly (heads, vocabulary, feed-forward widths: the checks ``parallelize`` and the config run),
ZeRO-1, 2 and 3, activation checkpointing off and on, micro-batches of powers of two up to
--max-micro; the accumulation follows from micro x accumulation x DP = global batch. An
objective that refuses accumulation (stage 0's contrastive loss sees micro x DP pairs, and the
global batch must be that) keeps it at 1.

Memory per GPU is the launcher's own dry-run plan of each layout (``build_plan`` of
``pali3_train.engine.dry_run``, from ``engine.memory``: weights, gradients, optimizer states, one
micro-batch's activations),
so a recommendation pasted into a config shows the same figures under ``launcher/run.py
--dry-run``. A layout fits if (states + activations) x (1 + --fragmentation) + --reserve GiB
(CUDA context, NCCL and DeepSpeed buffers) is at most --gpu-memory GiB.

Step time is executed FLOPs over throughput: F x global batch / (GPUs x --peak-tflops x --hfu),
F the hardware FLOPs of one sample's forward and backward (``pali3_train.engine.flops``, worked
out from the config): the model FLOPs, plus activation checkpointing's recompute where a layout
checkpoints. --hfu is the fraction of the peak the device executes, the trainer's logged ``hfu``
(with checkpointing off it equals ``mfu``), so it can be read off a real run. 6 x parameters x
tokens would overcount this model ~1.8x (5B, 224 px, all training): each tower sees its own
tokens (ViT the patches, the UL2 encoder patches + prompt, the decoder the target), frozen
weights get no gradient (a frozen tower with nothing trainable before it, no backward at all),
and attention counts. FLOPs split over TP ranks (a few replicated layers aside), so layouts
differ in time by recompute only; communication is inside the assumed HFU. Among equally fast
layouts the planner prefers the lower ZeRO stage (ZeRO-3 gathers every weight in each
micro-step's forward and backward; ZeRO-2 reduces gradients every micro-step, ZeRO-1 once a
step), then the smaller TP (activation all-reduces in every block, smaller matmuls), then fewer
micro-steps.

Not checked here, for want of a GPU: measured memory. Run the recommendation a few steps and
compare the trainer's ``memory_gib`` with the estimate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

from pali3_train.cli import command_parser
from pali3_train.config import Config, ConfigError, add_overrides_option, load_config
from pali3_train.config.schema import FieldError
from pali3_train.engine.checks import check_stage_flag
from pali3_train.engine.dry_run import build_plan
from pali3_train.engine.flops import SampleFlops
from pali3_train.engine.memory import Count, GiB, ModelStates, RankParams
from pali3_train.engine.peak import HOPPER_SXM
from pali3_train.stages.curriculum import CURRICULUM
from pali3_train.stages.registry import spec_for, stage_model

PEAK_TFLOPS = HOPPER_SXM["bf16"]  # H100 SXM / H200, dense bf16


class PlanError(ValueError):
    """No layout meets the request; the message starts with the option to change."""


@dataclass(frozen=True)
class Cluster:
    """The request: the GPUs, and the assumptions that turn estimates into fit and time."""

    gpus: int
    gpu_memory_gib: float
    gpus_per_node: int = 8
    hfu: float = 0.4
    peak_tflops: float = PEAK_TFLOPS
    fragmentation: float = 0.10  # allocator fragmentation, on top of the estimate
    reserve_gib: float = 2.0  # CUDA context, NCCL and DeepSpeed communication buffers
    max_micro: int = 256


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    zero: int
    checkpointing: bool
    micro: int
    accumulation: int
    rank: RankParams  # what one TP rank holds
    states: ModelStates  # bytes per GPU
    activations: float  # bytes per GPU, one micro-batch
    required: float  # bytes per GPU, with the margin
    step_s: float

    @property
    def samples_per_s(self) -> float:
        return self.micro * self.accumulation * self.dp / self.step_s

    @property
    def order(self) -> tuple:
        """Sort key: fastest first, then the cheaper communication (module docstring)."""
        return (self.step_s, self.zero, self.tp, self.accumulation)

    def describe(self) -> str:
        ckpt = "on" if self.checkpointing else "off"
        return f"TP {self.tp}, ZeRO-{self.zero}, checkpointing {ckpt}, micro-batch {self.micro}"


def _micro_batches(cfg: Config, per_rank: int, cap: int) -> list[int]:
    if not spec_for(cfg).accumulates:
        return [per_rank]  # accumulation 1
    return [2**i for i in range(cap.bit_length()) if 2**i <= cap and per_rank % 2**i == 0]


def _layout_config(cfg: Config, tp: int, zero: int, micro: int) -> Config:
    return replace(
        cfg,
        train=replace(cfg.train, micro_batch_size=micro),
        parallel=replace(cfg.parallel, tensor_parallel_size=tp, zero_stage=zero),
    )


@dataclass(frozen=True)
class Search:
    """Every layout of one stage on one cluster, best first, fitting or not."""

    cfg: Config
    where: str
    cluster: Cluster
    layouts: list[Layout]
    skipped: dict[int, str]  # TP size -> why it cannot be used
    flops: SampleFlops  # one sample's
    modules: tuple[Count, ...]  # parameters per top-level module, as the dry run counts them

    @property
    def fitting(self) -> list[Layout]:
        return [x for x in self.layouts if x.required <= self.cluster.gpu_memory_gib * GiB]


def search(cfg: Config, cluster: Cluster, where: str = "config") -> Search:
    """Plans every layout; raises PlanError if the GPUs are not whole nodes or no TP size can be
    used at all."""
    gpus, per_node = cluster.gpus, cluster.gpus_per_node
    if gpus % per_node:
        partial = f" (one partial node: --gpus-per-node {gpus})" if gpus < per_node else ""
        raise PlanError(
            f"--gpus-per-node: --world-size {gpus} is not a whole number of {per_node}-GPU "
            f"nodes{partial}"
        )
    model = stage_model(cfg, where)
    batch = cfg.train.global_batch_size
    plans, skipped = {}, {}
    for tp in (t for t in range(1, per_node + 1) if per_node % t == 0):
        dp = gpus // tp
        if batch % dp:
            skipped[tp] = f"DP {dp} does not divide the global batch {batch}"
            continue
        micros = _micro_batches(cfg, batch // dp, cluster.max_micro)
        try:
            plans |= {
                (tp, zero, micro): build_plan(
                    _layout_config(cfg, tp, zero, micro), gpus, per_node, where, model
                )
                for zero in (1, 2, 3)
                for micro in micros
            }
        except ConfigError as exc:  # a layer TP cannot split, or the stage's own checks
            skipped[tp] = str(exc).removeprefix(f"{exc.source}: ")
        except FieldError as exc:  # heads or vocabulary, as the config checks them
            skipped[tp] = f"{exc.field_path}: {exc}"
    if not plans:
        why = "; ".join(f"TP {tp}: {reason}" for tp, reason in skipped.items())
        if batch % gpus:  # TP 1 passes every divisibility check: the batch is at fault
            raise PlanError(f"--global-batch: no layout splits it ({why}); multiples of {gpus} do")
        raise PlanError(f"no layout can be used: {why}")

    flops = spec_for(cfg).flops(cfg)
    throughput = gpus * cluster.peak_tflops * 1e12 * cluster.hfu
    found = []
    for (tp, zero, micro), plan in plans.items():
        for ckpt in (False, True):
            act = plan.activations.total(ckpt)
            need = (plan.states.total + act) * (1 + cluster.fragmentation)
            found.append(
                Layout(tp, plan.dp, zero, ckpt, micro, plan.accumulation, plan.rank, plan.states,
                       act, need + cluster.reserve_gib * GiB,
                       flops.hardware(ckpt) * batch / throughput)
            )  # fmt: skip
    found.sort(key=lambda x: x.order)
    return Search(cfg, where, cluster, found, skipped, flops, plan.modules)


def recommend(found: Search) -> Layout:
    """The best layout that fits --gpu-memory; PlanError naming the smallest need if none does."""
    if found.fitting:
        return found.fitting[0]
    least = min(found.layouts, key=lambda x: x.required)
    raise PlanError(
        f"--gpu-memory: no layout fits {found.cluster.gpu_memory_gib:g} GiB per GPU; the smallest "
        f"needs {least.required / GiB:.1f} GiB ({least.describe()}: model states "
        f"{least.states.total / GiB:.1f} GiB + activations {least.activations / GiB:.1f} GiB, "
        f"x {1 + found.cluster.fragmentation:g} + {found.cluster.reserve_gib:g} GiB reserve). "
        "What would help: GPUs with at least that much memory; more --world-size "
        f"(ZeRO-3 divides the states by DP); shorter sequences (--image-size-px, --prompt-tokens, "
        f"--target-tokens) for the activations; or freezing more (--set stage.freeze=[...])"
    )


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_report(found: Search, best: Layout, top: int = 8) -> str:
    """Assumptions, the best fitting layout of each TP x ZeRO x checkpointing (its largest
    micro-batch), and the recommendation as YAML for a stage config."""
    cfg, cluster, spec = found.cfg, found.cluster, spec_for(found.cfg)
    vit, train = cfg.model.vit, cfg.train
    tokens = spec.tokens_per_sample(cfg)
    text = " + ".join(f"{n} {kind}" for kind, n in tokens.items() if kind != "image")
    stage = cfg.stage.name or cfg.stage.objective
    nodes = f"{cluster.gpus // cluster.gpus_per_node} node"
    nodes += "s" if cluster.gpus > cluster.gpus_per_node else ""
    params, trainable = (sum(x) for x in zip(*((m.total, m.trainable) for m in found.modules)))
    lines = [
        f"capacity plan: stage {stage} of {found.where} on {cluster.gpus} GPUs ({nodes} x "
        f"{cluster.gpus_per_node}), {cluster.gpu_memory_gib:g} GiB each",
        f"model       {params:,} parameters, {trainable:,} trainable; {train.precision}",
        f"            per sample {tokens['image']:,} image tokens ({vit.num_patches:,} a "
        f"{vit.image_size_px} px image or frame) + "
        f"{text}; frozen: {', '.join(cfg.stage.freeze) or 'nothing'}",
        f"batch       global {train.global_batch_size:,}"
        + (
            ""
            if spec.accumulates
            else f" (accumulation 1: the {spec.objective} loss sees micro x DP pairs)"
        ),
        f"time        {found.flops.model / 1e12:.2f} TFLOP per sample (model FLOPs), "
        f"{found.flops.hardware(True) / 1e12:.2f} with checkpointing's recompute",
        f"            (hardware FLOPs, engine/flops.py) at HFU {cluster.hfu:g} of "
        f"{cluster.peak_tflops:g} TFLOP/s",
        f"memory      engine/memory.py estimate x {1 + cluster.fragmentation:g} + "
        f"{cluster.reserve_gib:g} GiB reserve; {len(found.fitting)} of {len(found.layouts)} "
        "layouts fit",
        *(f"            TP {tp} left out: {reason}" for tp, reason in found.skipped.items()),
        "",
        f"    {'TP':>3} {'DP':>4} {'ZeRO':>4} {'ckpt':>4} {'micro':>5} {'accum':>5} "
        f"{'states':>7} {'activ':>7} {'total':>7} {'step s':>7} {'samples/s':>9}",
    ]
    shown: set[tuple] = set()
    for x in found.fitting:
        group = (x.tp, x.zero, x.checkpointing)
        if group in shown or len(shown) == top:
            continue
        shown.add(group)
        lines.append(
            f"  {'*' if x is best else ' '} {x.tp:>3} {x.dp:>4} {x.zero:>4} "
            f"{'on' if x.checkpointing else 'off':>4} {x.micro:>5} {x.accumulation:>5} "
            f"{_gib(x.states.total):>7} {_gib(x.activations):>7} {_gib(x.required):>7} "
            f"{x.step_s:>7.2f} {x.samples_per_s:>9,.0f}"
        )
    lines += [
        "    GiB per GPU (total: with the margin); each row the largest micro-batch that fits",
        "",
        f"recommended: {best.describe()}, accumulation {best.accumulation}",
        f"             {_gib(best.required)} GiB per GPU, {best.step_s:.2f} s per step, "
        f"{best.samples_per_s:,.0f} samples/s",
        f"# for the stage config; check: python launcher/run.py --config ... "
        f"--dry-run --world-size {cluster.gpus}",
        "train:",
        f"  global_batch_size: {train.global_batch_size}",
        f"  micro_batch_size: {best.micro}  # x accumulation {best.accumulation} x DP {best.dp}",
        f"  precision: {train.precision}",
        "parallel:",
        f"  tensor_parallel_size: {best.tp}",
        f"  zero_stage: {best.zero}",
        f"  activation_checkpointing: {'true' if best.checkpointing else 'false'}",
    ]
    return "\n".join(lines)


def load(args: argparse.Namespace) -> tuple[Config, str]:
    """The stage's config with the command line's overrides; a bare --model trains in bf16 and
    freezes what PaLI-3's curriculum freezes at that stage (``--stage``, default 1)."""
    overrides = []
    if args.model:
        stage = CURRICULUM[args.stage or "1"]
        overrides += [
            "train.precision=bf16",
            f"stage.name='{stage.name}'",
            f"stage.objective={stage.objective}",
            f"stage.freeze={list(stage.freeze)}",
        ]
    for option, key in (
        ("global_batch", "train.global_batch_size"),
        ("image_size_px", "model.vit.image_size_px"),
        ("prompt_tokens", "data.max_prompt_tokens"),
        ("target_tokens", "data.max_target_tokens"),
    ):
        if getattr(args, option) is not None:
            overrides.append(f"{key}={getattr(args, option)}")
    overrides.append("train.micro_batch_size=1")  # the planner picks it; 1 divides any batch
    where = args.model or args.config
    return check_stage_flag(load_config(where, overrides + args.set), args.stage, where), where


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.cluster.plan", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model preset (bf16, the stage's usual freezing)")
    source.add_argument("--config", help="a stage config (its precision, freezing, batch)")
    parser.add_argument("--stage", choices=tuple(CURRICULUM), help="--model: default 1")
    parser.add_argument("--world-size", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs a node has")
    parser.add_argument("--global-batch", type=int, help="default: the config's")
    parser.add_argument("--image-size-px", type=int, help="model.vit.image_size_px")
    parser.add_argument("--prompt-tokens", type=int, help="data.max_prompt_tokens")
    parser.add_argument("--target-tokens", type=int, help="data.max_target_tokens")
    parser.add_argument(
        "--hfu", type=float, default=0.4, help="hardware FLOPs utilisation, as the trainer logs it"
    )
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="per GPU, dense")
    parser.add_argument("--fragmentation", type=float, default=0.10, help="memory margin")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB kept free per GPU")
    parser.add_argument("--max-micro", type=int, default=256, help="largest micro-batch tried")
    add_overrides_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("world_size", "gpu_memory", "gpus_per_node", "hfu", "peak_tflops", "max_micro"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.hfu > 1:
        parser.error("--hfu is a fraction of the peak, at most 1")
    cluster = Cluster(
        args.world_size, args.gpu_memory, args.gpus_per_node, args.hfu, args.peak_tflops,
        args.fragmentation, args.reserve, args.max_micro,
    )  # fmt: skip
    try:
        cfg, where = load(args)
        found = search(cfg, cluster, where)
        best = recommend(found)
    except (ConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(found, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
