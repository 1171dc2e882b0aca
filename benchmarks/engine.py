"""Step time and memory per rank under DeepSpeed ZeRO-0, ZeRO-2, ZeRO-3 and tensor parallelism.

    .venv/bin/python -m benchmarks.engine [--model configs/models/small.yaml] [--steps 8]
        [--nproc 2] [--out benchmarks/results/engine.md]

(as a module, like ``benchmarks.data_pipeline``: run as a file, the ``benchmarks`` folder would
come first on the path and its ``data_pipeline.py`` would hide the ``data_pipeline`` package.)

Why: the parallel layout is a trade of memory per rank against time per step, and the table puts
numbers on it for one model and one global batch. Each layout runs in fresh processes (spawn,
gloo on CPU) through the engine's own pieces: ``build_model``, ``make_optimizer``,
``deepspeed_config`` and ``deepspeed.initialize`` with ``DeepSpeedMPU``, as the trainer does,
on synthetic stage-1 batches (the ViT frozen, as in stage 1; ``--freeze`` changes it), so no data
pipeline is involved. ZeRO-0 is DeepSpeed's DDP equivalent and the baseline of every ratio.
TP=2 runs with ZeRO-0: on 2 ranks its data-parallel size is 1, where ZeRO has nothing to split
(with ``--nproc 4`` it is TP=2 x DP=2, still ZeRO-0, so the row isolates tensor parallelism).

Per layout: the median step time over ``--steps`` optimizer steps after ``--warmup`` (a step's
time is that of its slowest rank); each rank's peak RSS (``getrusage`` up to the end of
``deepspeed.initialize``, then the kernel's high-water mark reset and read again after the steps,
so a note can say which phase set it; RSS includes the ~0.5 GiB torch/DeepSpeed baseline, which
the note states); the model and optimizer state each rank holds after the last step
(parameters or ZeRO-3's partitions of them, fp32 master copies, Adam's moments: every tensor
storage counted once; gradients and ZeRO's gradient buffers and buckets are left out), which
shows the partitioning more plainly than RSS; and the loss of every step over the global
batch, which every layout should reproduce (it is the same computation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pali3_train.config import Config, config_from_dict, load_config, to_dict
from pali3_train.data_pipeline.transforms import Batch, model_input
from pali3_train.engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "DS_ACCELERATOR": "cpu",  # DeepSpeed picks its accelerator when first imported
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
}
MiB = 2**20


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int
    zero: int


LAYOUTS = (
    Layout("ZeRO-0", 1, 0),
    Layout("ZeRO-2", 1, 2),
    Layout("ZeRO-3", 1, 3),
    Layout("TP=2, ZeRO-0", 2, 0),
)


@dataclass(frozen=True)
class Workload:
    model: str
    freeze: tuple[str, ...]
    micro_batch: int
    global_batch: int
    warmup: int
    steps: int
    prompt_tokens: int
    target_tokens: int


# ------------------------------------------------------------------------------- one rank


def make_config(work: Workload, layout: Layout) -> Config:
    model = load_config(ROOT / work.model).model
    return config_from_dict(
        {
            "model": to_dict(model),
            "train": {
                "steps": work.warmup + work.steps,
                "global_batch_size": work.global_batch,
                "micro_batch_size": work.micro_batch,
                "lr": 1e-3,
                "lr_schedule": "constant",
                "warmup_steps": 0,
                "weight_decay": 0.1,
                "grad_clip_norm": 1.0,
            },
            "parallel": {"tensor_parallel_size": layout.tp, "zero_stage": layout.zero},
            "stage": {"freeze": list(work.freeze)},
            "tracking": {"backend": "none"},
        }
    )


def micro_batch(step: int, index: int, cfg: Config, work: Workload) -> Batch:
    """Micro-batch ``index`` of global batch ``step``: the same in every layout, model-ready."""
    g = torch.Generator().manual_seed(1000 * step + index)
    n, size, vocab = work.micro_batch, cfg.model.vit.image_size_px, cfg.model.ul2.vocab_size
    prompt = torch.randint(3, vocab, (n, work.prompt_tokens), generator=g)
    target = torch.randint(3, vocab, (n, work.target_tokens), generator=g)
    batch = Batch(
        images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        prompt=prompt,
        prompt_mask=torch.ones_like(prompt, dtype=torch.bool),
        target=target,
        target_mask=torch.ones_like(target, dtype=torch.bool),
        keys=(),
        sources=(),
        worker=0,
        health={},
    )
    return model_input(batch, torch.device("cpu"), torch.float32)


def _storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not in ``seen`` (views of one flat buffer, and
    tensors shared between the model and the optimizer, count once)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def held_state(engine) -> tuple[int, int]:
    """(parameter bytes, optimizer bytes) this rank holds: the module's parameters (ZeRO-3:
    this rank's partitions and the persistent small ones), then what the innermost torch optimizer
    adds (ZeRO's fp32 master partitions, Adam's moments)."""
    seen: set[int] = set()
    params = list(engine.module.parameters())
    param_bytes = _storage_bytes(
        [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params], seen
    )
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    moments = [t for state in optimizer.state.values() for t in state.values()]
    return param_bytes, _storage_bytes(masters + moments, seen)


def _reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (``VmHWM``, which ``getrusage`` reads too)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or reset) from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _quiet(log_path: str) -> None:
    """Send this rank's output (DeepSpeed's and megatron-core's start-up chatter) to a file."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _start(rank: int, world: int, port: int, layout: Layout):
    os.environ.update(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pali3_train.engine.distributed import DistEnv, init_distributed
    from pali3_train.parallel import ParallelDims, init_model_parallel

    init_distributed(DistEnv(rank, world, rank))
    dims = ParallelDims(world, layout.tp)
    init_model_parallel(dims)
    return dims


def _engine(cfg: Config, dims):
    import deepspeed

    from pali3_train.engine.build import build_model, make_engine

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return make_engine(cfg, build_model(cfg, dims), dims)


def _train(engine, cfg: Config, work: Workload, accum: int) -> tuple[list[float], list[float]]:
    """Every step's seconds (the optimizer step included) and loss over the global batch."""
    from pali3_train.parallel import dp_rank
    from pali3_train.stages.registry import spec_for

    objective, world = spec_for(cfg).loss, dist.get_world_size()
    seconds, losses = [], []
    for step in range(work.warmup + work.steps):
        total = torch.zeros(1)
        start = time.perf_counter()
        for micro in range(accum):
            loss = objective(engine, micro_batch(step, dp_rank() * accum + micro, cfg, work))
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        seconds.append(time.perf_counter() - start)
        dist.all_reduce(total)  # TP peers hold equal copies: divide by every rank
        losses.append(total.item() / (accum * world))
    return seconds, losses


def run_rank(rank: int, world: int, port: int, layout: Layout, work: Workload, out: str) -> None:
    _quiet(f"{out}/rank{rank}.log")
    dims = _start(rank, world, port, layout)
    import deepspeed  # noqa: F401  (part of the baseline, as in every trainer process)

    from pali3_train.engine.deepspeed_config import accumulation_steps
    from pali3_train.parallel import destroy_model_parallel

    baseline = _status_bytes("VmRSS")
    cfg = make_config(work, layout)
    engine = _engine(cfg, dims)
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    _reset_peak_rss()  # getrusage reads the same mark from here on
    seconds, losses = _train(engine, cfg, work, accumulation_steps(cfg, dims.dp))
    train_peak = _status_bytes("VmHWM")
    param_bytes, optimizer_bytes = held_state(engine)
    result = {
        "seconds": seconds[work.warmup :],
        "losses": losses,
        "baseline_rss": baseline,
        "setup_peak_rss": setup_peak,
        "train_peak_rss": train_peak,
        "param_bytes": param_bytes,
        "optimizer_bytes": optimizer_bytes,
    }
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ one layout


@dataclass(frozen=True)
class Measured:
    layout: Layout
    ranks: int
    step_s: float
    baseline_rss: int  # bytes, the largest rank's (as for the rest)
    setup_peak_rss: int  # building the model and the engine
    train_peak_rss: int  # the training steps
    param_bytes: int
    optimizer_bytes: int
    losses: list[float]

    @property
    def peak_rss(self) -> int:
        return max(self.setup_peak_rss, self.train_peak_rss)

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes


def measure(layout: Layout, work: Workload, nproc: int) -> Measured:
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(
                run_rank,
                (nproc, free_port(), layout, work, out),
                nprocs=nproc,
                start_method="spawn",
            )
        except Exception:
            for log in sorted(Path(out).glob("rank*.log")):
                print(f"--- {log.name}\n{log.read_text()[-4000:]}", file=sys.stderr)
            raise
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]
    slowest = [max(steps) for steps in zip(*(r["seconds"] for r in ranks))]
    return Measured(
        layout=layout,
        ranks=nproc,
        step_s=statistics.median(slowest),
        baseline_rss=max(r["baseline_rss"] for r in ranks),
        setup_peak_rss=max(r["setup_peak_rss"] for r in ranks),
        train_peak_rss=max(r["train_peak_rss"] for r in ranks),
        param_bytes=max(r["param_bytes"] for r in ranks),
        optimizer_bytes=max(r["optimizer_bytes"] for r in ranks),
        losses=ranks[0]["losses"],
    )


# ---------------------------------------------------------------------------------- report


def header(work: Workload, nproc: int) -> str:
    cfg = make_config(work, LAYOUTS[0])
    from pali3_train.models import PaLI3

    with torch.device("meta"):
        model = PaLI3(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in work.freeze)
    frozen_note = f", {'+'.join(work.freeze)} frozen" if work.freeze else ""
    return (
        f"{work.model} (PaLI-3, {total / 1e6:.1f} M params, {(total - frozen) / 1e6:.1f} M "
        f"trained{frozen_note}), fp32, AdamW; global batch {work.global_batch} (micro-batch "
        f"{work.micro_batch}, {work.prompt_tokens} prompt + {work.target_tokens} target tokens); "
        f"median of {work.steps} optimizer steps after {work.warmup} warm-up; {nproc} processes "
        f"(gloo, 1 thread each) on {platform.machine()} with {len(os.sched_getaffinity(0))} "
        f"cores; torch {torch.__version__}, deepspeed {version('deepspeed')}, megatron-core "
        f"{version('megatron-core')}"
    )


def table(results: list[Measured]) -> list[str]:
    base = results[0]
    rows = [
        "| config | TP x DP | step s | vs ZeRO-0 | peak RSS MiB/rank | vs ZeRO-0 | "
        "state MiB/rank (params + optimizer) | vs ZeRO-0 | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        tp = m.layout.tp
        rows.append(
            f"| {m.layout.name} | {tp} x {m.ranks // tp} | {m.step_s:.2f} | "
            f"{m.step_s / base.step_s:.2f}x | {m.peak_rss / MiB:.0f} | "
            f"{m.peak_rss / base.peak_rss:.2f}x | {m.state_bytes / MiB:.0f} "
            f"({m.param_bytes / MiB:.0f} + {m.optimizer_bytes / MiB:.0f}) | "
            f"{m.state_bytes / base.state_bytes:.2f}x | {m.losses[-1]:.5f} |"
        )
    return rows


def rss_note(results: list[Measured]) -> str:
    baseline = max(m.baseline_rss for m in results) / MiB
    at_setup = [m.layout.name for m in results if m.setup_peak_rss > m.train_peak_rss]
    where = (
        f"{', '.join(at_setup)} peaked while building the model and engine, the rest in training"
        if at_setup
        else "every layout peaked in the training steps, not while building the model"
    )
    return (
        f"Peak RSS includes ~{baseline:.0f} MiB per rank of Python, torch and DeepSpeed before "
        f"the model exists; {where}."
    )


def loss_note(results: list[Measured]) -> str:
    base = results[0].losses
    worst = max(abs(a - b) for m in results[1:] for a, b in zip(m.losses, base))
    return (
        f"Losses per step (all {len(base)}) agree with ZeRO-0's within {worst:.1e}; "
        f"ZeRO-0 went from {base[0]:.4f} to {base[-1]:.4f}."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="configs/models/small.yaml")
    parser.add_argument("--freeze", nargs="*", default=["vit"], help="none: train everything")
    parser.add_argument("--nproc", type=int, default=2, help="2 or 4 (TP=2 x DP=nproc/2)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, help="default: micro-batch x nproc")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--target-tokens", type=int, default=32)
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.update(ENV)  # inherited by the spawned ranks, before they import DeepSpeed
    work = Workload(
        model=args.model,
        freeze=tuple(f for f in args.freeze if f != "none"),
        micro_batch=args.micro_batch,
        global_batch=args.global_batch or args.micro_batch * args.nproc,
        warmup=args.warmup,
        steps=args.steps,
        prompt_tokens=args.prompt_tokens,
        target_tokens=args.target_tokens,
    )
    results = []
    for layout in LAYOUTS:
        start = time.perf_counter()
        results.append(measure(layout, work, args.nproc))
        print(f"{layout.name}: {time.perf_counter() - start:.0f} s", flush=True)
    notes = [rss_note(results), loss_note(results)]
    command = " ".join(["python -m benchmarks.engine", *sys.argv[1:]])
    report = "\n".join(
        [f"`{command}`", "", header(work, args.nproc), "", *table(results), "", *notes]
    )
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
