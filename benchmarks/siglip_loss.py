"""Time and peak memory per rank of the chunked ring sigmoid loss against an all-gather one.

    .venv/bin/python -m benchmarks.siglip_loss [--worlds 2 4] [--batches 256 512 1024]
        [--dim 256] [--reps 9] [--warmup 2] [--out-dir benchmarks/results]

Why: ``pali3_train.losses.siglip_ring`` exists so that no rank ever holds more than one b x b
block of logits (b: the local batch); the usual way, all-gathering the texts and scoring this
rank's images against the whole global batch, holds a b x (n b) matrix and everything autograd
keeps of it. The goals are ~1/n of the all-gather's peak memory for at most ~1.1x its time.

What: for each world size, fresh processes (spawn, gloo, one thread each; more processes than
cores oversubscribe them, and the output says so) run, per local batch b, the forward and
backward of the loss alone on fp32 leaf embeddings [b, dim] (L2-normalised, texts correlated with
their images) with SigLIP's initial t' = log 10, b = -10, four ways: the ring with fused blocks
(``kernels.ring_loss: fused``, the default) one- and two-directional, the two-directional ring
with plain blocks (the reference kernel, for the before/after in the same run), and
``all_gather_sigmoid_loss`` below (differentiable all-gather of the texts, then this rank's
b x (n b) logits, normalised like the ring: its rows' sum / b). Once per b, the losses and all
gradients of the rings are compared with the all-gather's (the maximum difference is printed), so
the comparison is between equal computations.

Time: every repetition runs the three methods in turn, each started behind a barrier, in an
order that rotates (so a burst of outside load, or what one method leaves to the allocator, does
not always hit the same one); a repetition's time is its slowest rank's, and the table gives the
median over ``--reps`` after ``--warmup``. On 2 ranks the two fused rings run the same schedule
(the one hop is the rank opposite), so their difference there shows the noise.

Memory: one more run of each method under ``torch.profiler`` (``benchmarks.allocations``): the
peak of what the loss computation allocates (logits, autograd's saved tensors, received chunks,
gathered texts, gradients), not the inputs, which exist before. Sanity check: the all-gather's
peak over b * n b * 4 bytes (one logit matrix) is printed and should stay a small constant as b
grows; each ring's over b * b * 4 falls with b towards its count of b x b buffers (the fused
kernel's goal: at most 3), since the chunks, accumulators and gradients, b x dim each, weigh
as much as a block at b = dim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.allocations import peak_bytes
from pali3_train.engine.distributed import DistEnv, free_port, init_distributed
from pali3_train.losses.siglip_ring import ring_sigmoid_loss

MiB = 2**20
FP32 = 4
METHODS = ("ring 1-dir", "ring 2-dir", "plain ring 2-dir", "all-gather")
RINGS = METHODS[:3]
FUSED = METHODS[:2]
LossFn = Callable[..., torch.Tensor]


def all_gather_sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """The baseline: all texts of the global batch on every rank, this rank's images against
    them in one b x (n b) logit matrix; this rank's share as the ring returns it."""
    b, rank = len(image_emb), dist.get_rank()
    texts = torch.cat(dist_nn.all_gather(text_emb))  # backward: all-to-all, then a sum
    logits = image_emb @ texts.T * logit_scale.exp() + logit_bias
    labels = torch.full_like(logits, -1.0)
    labels[:, rank * b : (rank + 1) * b].fill_diagonal_(1.0)
    return -F.logsigmoid(labels * logits).sum() / b


LOSSES: dict[str, LossFn] = {
    "ring 1-dir": lambda *args: ring_sigmoid_loss(*args, bidirectional=False, kernel="fused"),
    "ring 2-dir": lambda *args: ring_sigmoid_loss(*args, bidirectional=True, kernel="fused"),
    "plain ring 2-dir": lambda *args: ring_sigmoid_loss(*args, bidirectional=True, kernel="plain"),
    "all-gather": all_gather_sigmoid_loss,
}


# ------------------------------------------------------------------------------- one rank


def leaves(b: int, dim: int, rank: int) -> list[torch.Tensor]:
    """This rank's image and text embeddings, t' and b, as fp32 leaves requiring grad."""
    g = torch.Generator().manual_seed(1000 * b + rank)
    images = F.normalize(torch.randn(b, dim, generator=g))
    texts = F.normalize(images + 0.7 * torch.randn(b, dim, generator=g))
    scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    return [t.requires_grad_(True) for t in (images, texts, scale, bias)]


def step(fn: LossFn, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Forward and backward of the loss alone; the gradients land in ``inputs``."""
    for t in inputs:
        t.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss.detach()


def timed(fn: LossFn, inputs: list[torch.Tensor]) -> float:
    dist.barrier()
    start = time.perf_counter()
    step(fn, inputs)
    return time.perf_counter() - start


def step_peak(fn: LossFn, inputs: list[torch.Tensor]) -> int:
    """The most bytes one step held at once."""
    for t in inputs:
        t.grad = None  # freed here, not inside the measured window
    return peak_bytes(lambda: step(fn, inputs), torch.device("cpu"))


def differences(inputs: list[torch.Tensor]) -> dict[str, float]:
    """Largest differences of the loss and of every gradient between the all-gather and each
    ring, on this rank."""
    results = {}
    for name in METHODS:
        loss = step(LOSSES[name], inputs)
        results[name] = [loss] + [t.grad.clone() for t in inputs]
    base = results["all-gather"]
    return {
        f"{name} {what}": max((a - b).abs().max().item() for a, b in pairs)
        for name in RINGS
        for what, pairs in (
            ("loss", [(results[name][0], base[0])]),
            ("grads", list(zip(results[name][1:], base[1:]))),
        )
    }


def measure_batch(b: int, args: argparse.Namespace, rank: int) -> dict:
    inputs = leaves(b, args.dim, rank)
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    for rep in range(args.warmup + args.reps):
        turn = rep % len(METHODS)
        for name in METHODS[turn:] + METHODS[:turn]:  # interleaved, order rotating
            elapsed = timed(LOSSES[name], inputs)
            if rep >= args.warmup:
                seconds[name].append(elapsed)
    peaks = {name: step_peak(LOSSES[name], inputs) for name in METHODS}
    return {"seconds": seconds, "peak": peaks, "diff": differences(inputs)}


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    fd = os.open(f"{out}/rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)  # the profiler's start/stop chatter goes to a log, not the table
    os.dup2(fd, 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(DistEnv(rank, world, rank))
    results = {b: measure_batch(b, args, rank) for b in args.batches}
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ one world


@dataclass(frozen=True)
class Row:
    world: int
    b: int
    ms: dict[str, float]  # median over repetitions of the slowest rank
    peak: dict[str, int]  # bytes, the largest rank's
    diff: dict[str, float]  # the largest over ranks

    def time_ratio(self, ring: str) -> float:
        return self.ms[ring] / self.ms["all-gather"]

    def memory_ratio(self, rings: tuple[str, ...] = FUSED) -> float:
        return max(self.peak[ring] for ring in rings) / self.peak["all-gather"]


def measure_world(world: int, args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(run_rank, (world, free_port(), args, out), nprocs=world,
                               start_method="spawn")  # fmt: skip
        except Exception:
            for log in sorted(Path(out).glob("rank*.log")):
                print(f"--- {log.name}\n{log.read_text()[-4000:]}", file=sys.stderr)
            raise
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    return [_row(world, b, [r[str(b)] for r in ranks]) for b in args.batches]


def _row(world: int, b: int, ranks: list[dict]) -> Row:
    def slowest_median(name: str) -> float:
        return 1e3 * statistics.median(map(max, zip(*(r["seconds"][name] for r in ranks))))

    return Row(
        world=world,
        b=b,
        ms={name: slowest_median(name) for name in METHODS},
        peak={name: max(r["peak"][name] for r in ranks) for name in METHODS},
        diff={key: max(r["diff"][key] for r in ranks) for key in ranks[0]["diff"]},
    )


# ---------------------------------------------------------------------------------- report


def header(args: argparse.Namespace) -> str:
    cores = len(os.sched_getaffinity(0))
    over = [w for w in args.worlds if w > cores]
    note = (
        f" World size {', '.join(map(str, over))} oversubscribes the {cores} cores: its times "
        "include processes waiting for a core."
        if over
        else ""
    )
    return (
        f"Forward + backward of the loss alone, fp32, embedding dim {args.dim}, t' = log 10, "
        f"b = -10; median of {args.reps} repetitions after {args.warmup} warm-up, slowest rank; "
        f"peak = bytes allocated by the step (torch.profiler), largest rank; gloo, 1 thread per "
        f"process, {platform.machine()} with {cores} cores, torch {torch.__version__}.{note}"
    )


def table(rows: list[Row]) -> list[str]:
    """Times and peaks; "ring" is the fused kernel, "plain" the 2-dir ring on the plain one."""
    lines = [
        "| world | b | global batch | ring 1-dir ms | ring 2-dir ms | plain ring ms | "
        "all-gather ms | time ring/AG (1-dir, 2-dir) | plain ring/AG | ring peak MiB (1-dir, "
        "2-dir) | plain ring peak MiB | all-gather peak MiB | memory ring/AG | plain ring/AG | "
        "1/n |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.world} | {r.b} | {r.world * r.b} | "
            + " | ".join(f"{r.ms[name]:.1f}" for name in METHODS)
            + f" | {r.time_ratio('ring 1-dir'):.2f}x, {r.time_ratio('ring 2-dir'):.2f}x | "
            f"{r.time_ratio('plain ring 2-dir'):.2f}x | "
            f"{r.peak['ring 1-dir'] / MiB:.1f}, {r.peak['ring 2-dir'] / MiB:.1f} | "
            f"{r.peak['plain ring 2-dir'] / MiB:.1f} | {r.peak['all-gather'] / MiB:.1f} | "
            f"{r.memory_ratio():.2f} | {r.memory_ratio(('plain ring 2-dir',)):.2f} | "
            f"{1 / r.world:.2f} |"
        )
    return lines


def notes(rows: list[Row]) -> list[str]:
    """The equality check and the memory sanity check (peak in units of one logit matrix)."""
    loss = max(v for r in rows for k, v in r.diff.items() if k.endswith("loss"))
    grads = max(v for r in rows for k, v in r.diff.items() if k.endswith("grads"))
    gather = [r.peak["all-gather"] / (r.b * r.world * r.b * FP32) for r in rows]

    def blocks(rings: tuple[str, ...]) -> str:
        """The largest over worlds, for each b."""
        by_b = {r.b: 0.0 for r in rows}
        for r in rows:
            by_b[r.b] = max(by_b[r.b], *(r.peak[ring] / (r.b * r.b * FP32) for ring in rings))
        return ", ".join(f"{ratio:.2f} (b={b})" for b, ratio in by_b.items())

    return [
        f"Rings vs all-gather, every rank, world and b: max |loss difference| {loss:.1e}, max "
        f"|gradient difference| {grads:.1e} (images, texts, t', b).",
        f"Peak in logit matrices: all-gather / (b * n b * 4 B) = {min(gather):.2f}-"
        f"{max(gather):.2f}; fused ring / (b * b * 4 B) = {blocks(FUSED)}; plain ring: "
        f"{blocks(('plain ring 2-dir',))}.",
    ]


def plot(rows: list[Row], path: Path) -> None:
    """Peak memory against the local batch, log-log: one line per method and world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    widths = dict(zip(METHODS, (5, 1.5, 1.5, 1.5)))  # the fused rings coincide: 1-dir drawn under
    styles = dict(zip(sorted({r.world for r in rows}), ("-o", "--s", ":^", "-.v")))
    for world, style in styles.items():
        mine = [r for r in rows if r.world == world]
        for name in METHODS:
            peaks = [r.peak[name] / MiB for r in mine]
            ax.plot([r.b for r in mine], peaks, style, color=colours[name], lw=widths[name],
                    alpha=0.8, label=f"{name}, n={world}")  # fmt: skip
    batches = sorted({r.b for r in rows})
    ax.plot(batches, [b * b * FP32 / MiB for b in batches], color="grey", lw=1,
            label="one b x b fp32 block")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="local batch b", ylabel="peak MiB per rank",
           title="SigLIP loss forward + backward: peak allocated memory per rank")  # fmt: skip
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, help="write siglip_loss.md and siglip_loss.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    start = time.perf_counter()
    rows = [row for world in args.worlds for row in measure_world(world, args)]
    report = [header(args), "", *table(rows), "", *notes(rows)]
    print("\n".join(report))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "siglip_loss.md").write_text("\n".join(report) + "\n")
        plot(rows, args.out_dir / "siglip_loss.png")


if __name__ == "__main__":
    main()
