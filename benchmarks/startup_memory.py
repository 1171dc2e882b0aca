"""Peak memory per rank of a ZeRO-3 start-up, with and without partitioned construction.

    .venv/bin/python -m benchmarks.startup_memory [--model configs/models/1b.yaml] [--nproc 2]
        [--out benchmarks/results/startup_memory.md]

Why: without partitioning at construction every rank builds the whole fp32 model before
DeepSpeed partitions it, so a node needs a whole copy per rank (the 5B preset: 20 GB x 8 ranks);
built under ``deepspeed.zero.Init`` (``engine/zero_init.py``) a rank holds its partition only.
Start-up is what the trainer does before its first step: ``build_model`` (construction, the
``stage.init_from`` weights read tensor by tensor into it, freezing) and ``make_engine``
(``deepspeed.initialize``), both run here as the trainer runs them, in fresh spawned processes
(gloo, 1 thread each) per layout. The init_from file is written first, one tensor at a time
(random weights, PaLI-3 names). The ViT and UL2 are frozen by default (``--freeze``) so that the
optimizer state, which this does not change, stays out of the numbers; no step is taken.

Per rank: the RSS before the model exists, the peak RSS (the kernel's high-water mark) over
``build_model`` and over ``make_engine``, and the model bytes the rank holds at the end (its
partitions, or the whole model). The baseline of every ratio is the same run's unpartitioned
start-up (``parallel.zero.partitioned_init: false``). It needs a whole model per rank: the
benchmark refuses to start when the host's available memory is short of that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pali3_train.config import Config, config_from_dict, load_config, to_dict
from pali3_train.engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "DS_ACCELERATOR": "cpu",  # DeepSpeed picks its accelerator when first imported
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
}
MiB = 2**20
LAYOUTS = {"whole model per rank": False, "partitioned at construction": True}


@dataclass(frozen=True)
class Workload:
    model: str
    freeze: tuple[str, ...]
    init_from: str


def make_config(work: Workload, partitioned: bool, nproc: int) -> Config:
    return config_from_dict(
        {
            "model": to_dict(load_config(ROOT / work.model).model),
            "train": {"global_batch_size": nproc, "micro_batch_size": 1},
            "parallel": {"zero_stage": 3, "zero": {"partitioned_init": partitioned}},
            "stage": {"init_from": work.init_from, "freeze": list(work.freeze)},
            "tracking": {"backend": "none"},
        }
    )


# ----------------------------------------------------------------------------- init_from file


def write_init_from(cfg: Config, path: Path) -> int:
    """A PaLI-3 safetensors file of random weights, written one tensor at a time (the names and
    shapes come from the meta device), so this process never holds the model. Returns bytes."""
    from pali3_train.models import PaLI3

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in PaLI3(cfg.model).state_dict().items()}
    header: dict = {"__metadata__": {"kind": "pali3", "format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * shape.numel()
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():
            torch.randn(shape, generator=generator).mul_(0.02).numpy().tofile(f)
    return offset


# -------------------------------------------------------------------------------- one rank


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def held_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes on this rank: ZeRO-3's partitions, or the whole tensors."""
    return sum(
        p.ds_tensor.numel() * p.ds_tensor.element_size()
        if hasattr(p, "ds_tensor")
        else p.numel() * p.element_size()
        for p in model.parameters()
    )


def run_rank(rank: int, world: int, port: int, work: Workload, partitioned: bool, out: str):
    fd = os.open(f"{out}/rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import logging

    import deepspeed

    from pali3_train.engine.build import build_model, make_engine
    from pali3_train.engine.distributed import DistEnv, init_distributed
    from pali3_train.parallel import ParallelDims, init_model_parallel

    deepspeed.utils.logger.setLevel(logging.WARNING)
    init_distributed(DistEnv(rank, world, rank))
    dims = ParallelDims(world, 1)
    init_model_parallel(dims)
    cfg = make_config(work, partitioned, world)
    result = {"baseline_rss": _status_bytes("VmRSS")}
    _reset_peak_rss()
    start = time.perf_counter()
    model = build_model(cfg, dims)
    result |= {"build_peak": _status_bytes("VmHWM"), "build_s": time.perf_counter() - start}
    _reset_peak_rss()
    start = time.perf_counter()
    engine = make_engine(cfg, model, dims)
    result |= {"engine_peak": _status_bytes("VmHWM"), "engine_s": time.perf_counter() - start}
    result |= {"end_rss": _status_bytes("VmRSS"), "held": held_bytes(engine.module)}
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------ one layout


@dataclass(frozen=True)
class Measured:
    name: str
    baseline_rss: int  # the largest rank's, as for the rest
    build_peak: int
    engine_peak: int
    end_rss: int
    held: int
    seconds: float

    @property
    def peak(self) -> int:
        return max(self.build_peak, self.engine_peak)


def measure(name: str, work: Workload, nproc: int) -> Measured:
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(
                run_rank,
                (nproc, free_port(), work, LAYOUTS[name], out),
                nprocs=nproc,
                start_method="spawn",
            )
        except Exception:
            for log in sorted(Path(out).glob("rank*.log")):
                print(f"--- {log.name}\n{log.read_text()[-4000:]}", file=sys.stderr)
            raise
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]
    return Measured(
        name=name,
        baseline_rss=max(r["baseline_rss"] for r in ranks),
        build_peak=max(r["build_peak"] for r in ranks),
        engine_peak=max(r["engine_peak"] for r in ranks),
        end_rss=max(r["end_rss"] for r in ranks),
        held=max(r["held"] for r in ranks),
        seconds=max(r["build_s"] + r["engine_s"] for r in ranks),
    )


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# ---------------------------------------------------------------------------------- report


def header(work: Workload, cfg: Config, nproc: int, file_bytes: int) -> str:
    from pali3_train.models import PaLI3

    with torch.device("meta"):
        model = PaLI3(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in work.freeze)
    return (
        f"{work.model} (PaLI-3, {total / 1e9:.3f} B params, {4 * total / 2**30:.2f} GiB in fp32; "
        f"{'+'.join(work.freeze) or 'nothing'} frozen, {(total - frozen) / 1e6:.1f} M trained), "
        f"ZeRO-3, fp32; stage.init_from a {file_bytes / 2**30:.2f} GiB safetensors file; "
        f"{nproc} processes (gloo, 1 thread each) on {platform.machine()} with "
        f"{len(os.sched_getaffinity(0))} cores; torch {torch.__version__}, deepspeed "
        f"{version('deepspeed')}"
    )


def table(results: list[Measured]) -> list[str]:
    base = results[0]
    rows = [
        "| start-up | peak RSS MiB/rank | vs whole | build_model peak | make_engine peak | "
        "RSS after MiB/rank | model MiB held/rank | start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        rows.append(
            f"| {m.name} | {m.peak / MiB:.0f} | {m.peak / base.peak:.2f}x | "
            f"{m.build_peak / MiB:.0f} | {m.engine_peak / MiB:.0f} | {m.end_rss / MiB:.0f} | "
            f"{m.held / MiB:.0f} | {m.seconds:.0f} |"
        )
    return rows


def notes(results: list[Measured]) -> list[str]:
    base, part = results
    before = max(m.baseline_rss for m in results) / MiB
    return [
        f"RSS includes ~{before:.0f} MiB per rank of Python, torch and DeepSpeed before the model "
        "exists. Peaks are the kernel's high-water mark over each phase (build_model: "
        "construction, init_from, freezing; make_engine: deepspeed.initialize), the largest "
        "rank's.",
        f"Above that baseline the partitioned start-up peaks at "
        f"{(part.peak / MiB - before):.0f} MiB per rank against {(base.peak / MiB - before):.0f} "
        f"({(part.peak / MiB - before) / (base.peak / MiB - before):.2f}x).",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="configs/models/1b.yaml")
    parser.add_argument("--freeze", nargs="*", default=["vit", "ul2"], help="none: train all")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.update(ENV)  # inherited by the spawned ranks, before they import DeepSpeed
    freeze = tuple(f for f in args.freeze if f != "none")
    with tempfile.TemporaryDirectory() as folder:
        work = Workload(args.model, freeze, str(Path(folder) / "init_from.safetensors"))
        cfg = make_config(work, True, args.nproc)
        file_bytes = write_init_from(cfg, Path(work.init_from))
        need = args.nproc * (file_bytes + 700 * MiB)
        if available_bytes() < need:
            raise SystemExit(
                f"the unpartitioned start-up needs ~{need / 2**30:.1f} GiB (a whole model per "
                f"rank), {available_bytes() / 2**30:.1f} GiB are available"
            )
        results = []
        for name in LAYOUTS:
            start = time.perf_counter()
            results.append(measure(name, work, args.nproc))
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        report_header = header(work, cfg, args.nproc, file_bytes)
    command = " ".join(["python -m benchmarks.startup_memory", *sys.argv[1:]])
    report = "\n".join(
        [f"`{command}`", "", report_header, "", *table(results), "", *notes(results)]
    )
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
