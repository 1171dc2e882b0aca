"""Can this machine train? The smoke test to run first wherever a GPU is: one finding a section.

    .venv/bin/python -m benchmarks.gpu_smoke [--device cuda|cpu] [--out DIR]

(as a module, like the other benchmarks: run as a file, the ``benchmarks`` folder would come
first on the path and its ``data_pipeline.py`` would hide the ``data_pipeline`` package.)

Why: the test suite runs on CPU (gloo, CPU kernels, fp32 mostly), so what only a GPU shows -
NCCL, bf16 kernels, which attention kernel runs, real throughput and memory - needs its own
check, short enough for a borrowed machine (sized for under 7 minutes on one GPU; not yet
timed on one). Sections, in order, each announced as it starts and ends:

- ``versions``: Python, torch, CUDA, cuDNN, NCCL, triton, deepspeed, megatron-core, the device
  and its driver.
- ``matmul``: the bf16 matmul ceiling, 2 n^3 FLOPs per product, the mean over several products
  (CUDA events on a GPU: kernels run asynchronously, so the wall clock would time the launches).
- ``copy``: bandwidth of copying one large tensor on the device (bytes read + written per second).
- ``sdpa``: which ``scaled_dot_product_attention`` backend each attention call of the ViT and of
  the UL2 encoder takes at 224 and 812 px (one layer of each at PaLI-3 5B's widths, bf16, forward
  and backward under ``torch.profiler``): flash, memory-efficient, cuDNN or math, read from the
  aten op that ran (``SDPA_OPS``), with the device kernels that match attention as evidence.
- ``corpus``: a small demo corpus (``data_pipeline.demo_corpus``) for the runs below.
- ``stage0``, ``stage1``: 3 steps of the tiny preset's stage-0 and stage-1 recipes in bf16
  through ``launcher/run.py`` under torchrun with one process (NCCL on CUDA, gloo on CPU): the
  exit code and the losses from ``metrics.jsonl``.
- ``full_width_step``: 3 optimizer steps of the 5B stage-1 recipe (``configs/pali3_5b/
  stage1.yaml``: ViT frozen, bf16) at the 5B widths with 2 layers per tower, one process, ZeRO-2:
  the last step's tokens/s, MFU (model FLOPs from ``engine.flops`` over the peak table, and over
  the measured matmul ceiling) and peak memory against the dry run's estimate for that config.

A section that cannot run here (deepspeed or megatron-core missing, say) reports "skipped:
<reason>"; one that breaks reports "failed: <error>" and the others still run. The JSON lists
which sections ran, were skipped and failed; the exit code is 1 if any failed.

Sizes are a function of the device (``SIZES``). On CUDA they are the real ones. On CPU, bf16
matmuls run at about 1 GFLOP/s on 2 cores, so the CPU form (for CI: ~75 s on 2 cores) keeps
the structure - patch 14, head dims 104 and 64, the same recipes, every code path - but divides
the 5B widths and head counts by 16, profiles attention at 56 and 112 px instead of 224 and 812,
and times a 512^3 matmul: it checks that the smoke test works, not how fast the CPU is.

Output: ``DIR/gpu_smoke.json`` (everything) and ``DIR/gpu_smoke.md`` (the tables, also printed);
each launched run's log and run directory stay in DIR. Default DIR: ``runs/gpu_smoke/<device>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pali3_train.config import Config, SourceConfig, UL2Config, ViTConfig, load_config
from pali3_train.data_pipeline.demo_corpus import DemoCorpus, build_demo_corpus
from pali3_train.models.ul2 import UL2
from pali3_train.models.vit import VisionTransformer
from pali3_train.stages.curriculum import CURRICULUM

ROOT = Path(__file__).resolve().parents[1]
MODEL_5B = ROOT / "configs" / "models" / "pali3_5b.yaml"
STAGE1_5B = ROOT / "configs" / "pali3_5b" / "stage1.yaml"
MiB = 2**20
GiB = 2**30
STEPS = 3  # per launched run: the first step includes warm-up, the last is the one reported
PROMPT_TOKENS = 64  # text tokens after the visual ones in the UL2 encoder's attention


@dataclass(frozen=True)
class Sizes:
    """Problem sizes for one kind of device (module docstring)."""

    matmul_n: int
    matmul_reps: int
    copy_mib: int
    copy_reps: int
    width_divisor: int  # of the 5B widths and head counts; head dims stay as they are
    attention_px: tuple[int, ...]  # image sizes the attention backends are profiled at
    attention_batch: int
    step_px: int  # image size of the full-width step
    step_micro_batch: int
    step_text_tokens: int | None  # prompt and target length; None: the 5B recipe's
    data_workers: int
    launch_timeout_s: int  # per launched run


SIZES = {
    "cuda": Sizes(
        matmul_n=8192,
        matmul_reps=20,
        copy_mib=1024,
        copy_reps=20,
        width_divisor=1,
        attention_px=(224, 812),
        attention_batch=2,
        step_px=224,
        step_micro_batch=16,
        step_text_tokens=None,
        data_workers=4,
        launch_timeout_s=180,
    ),
    "cpu": Sizes(
        matmul_n=512,
        matmul_reps=3,
        copy_mib=64,
        copy_reps=5,
        width_divisor=16,
        attention_px=(56, 112),
        attention_batch=2,
        step_px=56,
        step_micro_batch=2,
        step_text_tokens=16,
        data_workers=0,
        launch_timeout_s=150,
    ),
}

# The aten op each SDPA backend dispatches to; its backward is the same name + "_backward". The
# math backend has no backward op of its own: autograd differentiates its bmm and softmax.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (device plug-in)",
    "aten::_scaled_dot_product_attention_math": "math",
}
ATTENTION_KERNEL = re.compile(r"flash|fmha|cutlass|mem_eff|efficient|cudnn|sdpa|attention", re.I)


class Skipped(Exception):
    """The section cannot run here; the message says why."""


class SectionFailed(Exception):
    """The section ran and found a problem; ``details`` go into the report beside the message."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


@dataclass
class Smoke:
    """What the sections share: the device, its sizes, the output folder, earlier findings."""

    device: torch.device
    sizes: Sizes
    out: Path
    results: dict[str, dict] = field(default_factory=dict)
    corpus: DemoCorpus | None = None


# ------------------------------------------------------------------------------ versions


def package_version(name: str) -> str | None:
    """The installed distribution's version, without importing it (deepspeed's import is slow
    and probes the accelerator)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nccl_version() -> str | None:
    if not torch.distributed.is_nccl_available():
        return None
    found = torch.cuda.nccl.version()
    return ".".join(map(str, found)) if isinstance(found, tuple) else str(found)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
        platform.machine(),
    )
    return f"{model} ({os.cpu_count()} cores)"


def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None


def versions(smoke: Smoke) -> dict:
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl_version(),
        "triton": package_version("triton"),
        "deepspeed": package_version("deepspeed"),
        "megatron-core": package_version("megatron-core"),
        "device": device_name(smoke.device),
        "driver": driver_version(),
    }
    shown = ", ".join(f"{k} {'-' if v is None else v}" for k, v in found.items())
    return {"versions": found, "summary": shown}


# ------------------------------------------------------------------------------ ceilings


def seconds_per_call(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    """Mean seconds of one call of ``fn`` over ``reps`` calls after one warm-up call: CUDA events
    around the calls on a GPU, the wall clock on CPU."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / reps


def matmul_ceiling(smoke: Smoke) -> dict:
    n, reps = smoke.sizes.matmul_n, smoke.sizes.matmul_reps
    a, b = torch.randn(2, n, n, device=smoke.device, dtype=torch.bfloat16)
    seconds = seconds_per_call(smoke.device, lambda: a @ b, reps)
    tflops = 2 * n**3 / seconds / 1e12
    return {
        "n": n,
        "reps": reps,
        "seconds": seconds,
        "tflops": tflops,
        "summary": f"{n}^3 bf16, {reps} products: {tflops:.4g} TFLOP/s",
    }


def copy_bandwidth(smoke: Smoke) -> dict:
    src = torch.ones(smoke.sizes.copy_mib * MiB // 4, device=smoke.device)
    dst = torch.empty_like(src)
    seconds = seconds_per_call(smoke.device, lambda: dst.copy_(src), smoke.sizes.copy_reps)
    gbs = 2 * src.nbytes / seconds / 1e9  # each byte read once and written once
    return {
        "mib": smoke.sizes.copy_mib,
        "seconds": seconds,
        "gb_per_s": gbs,
        "summary": f"{smoke.sizes.copy_mib} MiB copied: {gbs:.4g} GB/s read + written",
    }


# -------------------------------------------------------------------------- attention backends


def model_5b(sizes: Sizes, image_px: int, vit_depth: int, ul2_layers: int) -> dict:
    """Overrides of the 5B preset (``configs/models/pali3_5b.yaml``): its widths and head counts
    over ``sizes.width_divisor`` (head dims stay), the given image size and depths."""
    preset = yaml.safe_load(MODEL_5B.read_text())["model"]
    vit, ul2, k = preset["vit"], preset["ul2"], sizes.width_divisor
    return {
        "vit": {
            "image_size_px": image_px,
            "depth": vit_depth,
            **{name: vit[name] // k for name in ("width", "num_heads", "mlp_dim")},
        },
        "ul2": {
            "num_encoder_layers": ul2_layers,
            "num_decoder_layers": ul2_layers,
            **{name: ul2[name] // k for name in ("d_model", "num_heads", "d_ff")},
        },
    }


def tower_configs(sizes: Sizes, image_px: int) -> tuple[ViTConfig, UL2Config]:
    """One-layer ViT and UL2 of the 5B shapes (``model_5b``) at ``image_px``."""
    preset = yaml.safe_load(MODEL_5B.read_text())["model"]
    overrides = model_5b(sizes, image_px, vit_depth=1, ul2_layers=1)
    return (
        ViTConfig(**{**preset["vit"], **overrides["vit"]}),
        UL2Config(**{**preset["ul2"], **overrides["ul2"]}),
    )


def vit_attention(cfg: ViTConfig, batch: int, device: torch.device):
    """(forward, tokens): the ViT over random images."""
    vit = VisionTransformer(cfg).to(device, torch.bfloat16)
    px = cfg.image_size_px
    images = torch.randn(batch, 3, px, px, device=device, dtype=torch.bfloat16)
    return (lambda: vit(images)), cfg.num_patches


def ul2_encoder_attention(cfg: UL2Config, visual: int, batch: int, device: torch.device):
    """(forward, tokens): the UL2 encoder over ``visual`` visual tokens and a half-padded prompt,
    as in PaLI-3: its attention bias (relative positions + padding) goes to SDPA as a mask."""
    ul2 = UL2(cfg).to(device, torch.bfloat16)
    tokens = visual + PROMPT_TOKENS
    x = torch.randn(batch, tokens, cfg.d_model, device=device, dtype=torch.bfloat16)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    mask[:, -PROMPT_TOKENS // 2 :] = False
    return (lambda: ul2.encode(x, mask)), tokens


def sdpa_calls(events: list) -> tuple[list[str], list[str]]:
    """Backends of the forward and backward SDPA calls among profiler ``events``, in order."""
    names = [e.name for e in sorted(events, key=lambda e: e.time_range.start)]
    forward = [SDPA_OPS[n] for n in names if n in SDPA_OPS]
    fused_backward = [
        SDPA_OPS[n.removesuffix("_backward")]
        for n in names
        if n.endswith("_backward") and n.removesuffix("_backward") in SDPA_OPS
    ]
    return forward, fused_backward or [b for b in forward if b == "math"]


def attention_kernels(events: list) -> list[str]:
    """Device kernels among profiler ``events`` whose names say attention: torch lists a kernel
    as an event of its own or under the op that launched it (versions differ), so both count."""
    names = {e.name for e in events if e.device_type == DeviceType.CUDA}
    names |= {k.name for e in events for k in e.kernels}
    return sorted(n for n in names if ATTENTION_KERNEL.search(n))


def profile_attention(forward: Callable[[], torch.Tensor], device: torch.device) -> dict:
    """One forward and backward of ``forward()`` under the profiler, after one unprofiled (kernel
    selection and autotuning stay out of the profile): the backends each call took."""

    def step() -> None:
        forward().sum().backward()

    step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = list(prof.events())
    fwd, bwd = sdpa_calls(events)
    sdpa_ops = {e.name for e in events if e.name.removesuffix("_backward") in SDPA_OPS}
    kernels = attention_kernels(events)
    return {"forward": fwd, "backward": bwd, "ops": sorted(sdpa_ops), "kernels": kernels}


def sdpa(smoke: Smoke) -> dict:
    sizes, device, calls = smoke.sizes, smoke.device, []
    for px in sizes.attention_px:
        vit_cfg, ul2_cfg = tower_configs(sizes, px)
        cases = {
            "vit": partial(vit_attention, vit_cfg, sizes.attention_batch, device),
            "ul2_encoder": partial(
                ul2_encoder_attention, ul2_cfg, vit_cfg.num_patches, sizes.attention_batch, device
            ),
        }
        for tower, build in cases.items():
            forward, tokens = build()
            calls.append(
                {"tower": tower, "px": px, "tokens": tokens, **profile_attention(forward, device)}
            )
            del forward
            release_memory(device)
    shown = "; ".join(
        f"{c['tower']} {c['px']} px: {'/'.join(c['forward']) or '?'} fwd, "
        f"{'/'.join(c['backward']) or '?'} bwd"
        for c in calls
    )
    return {"calls": calls, "summary": shown}


# ------------------------------------------------------------------------------ launched runs


def corpus(smoke: Smoke) -> dict:
    """Enough samples for every run below, within the tiny preset's 1024-piece vocabulary."""
    where = smoke.out / "corpus"
    shutil.rmtree(where, ignore_errors=True)
    smoke.corpus = build_demo_corpus(
        where, samples_per_source=64, samples_per_shard=32, image_size_px=64, vocab_size=1024
    )
    sources = [s.name for s in smoke.corpus.sources()]
    return {
        "path": str(where),
        "sources": sources,
        "summary": f"{len(sources)} sources, 64 samples per source -> {where}",
    }


def require_launch(smoke: Smoke) -> DemoCorpus:
    """The corpus, once launcher/run.py can start here at all."""
    missing = [p for p in ("deepspeed", "megatron-core") if package_version(p) is None]
    if missing:
        raise Skipped(
            f"{' and '.join(missing)} not installed (launcher/run.py needs both; "
            "`make install` installs them)"
        )
    if smoke.corpus is None:
        raise Skipped("no corpus (see the corpus section)")
    return smoke.corpus


def data_section(corpus: DemoCorpus, sources: list[SourceConfig], workers: int) -> dict:
    return {
        "tokenizer_path": str(corpus.tokenizer_path),
        "sources": [dataclasses.asdict(s) for s in sources],
        "num_workers": workers,
    }


def short_run(smoke: Smoke, name: str, batch: int) -> dict:
    """What every launched run overrides: its folder, 3 bf16 steps, no tracking, no evaluation,
    no export, a checkpoint only at the end, no init_from."""
    return {
        "run_dir": str(smoke.out / "runs" / name),
        "train": {
            "steps": STEPS,
            "global_batch_size": batch,
            "micro_batch_size": batch,
            "warmup_steps": 1,
            "precision": "bf16",
        },
        "tracking": {"backend": "none"},
        "eval": {"every_steps": 0, "sources": [], "zero_shot": []},
        "checkpoint": {"every_steps": 1000, "export_final": False},
    }


def write_config(smoke: Smoke, name: str, config: dict) -> Path:
    path = smoke.out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_stage_config(smoke: Smoke, corpus: DemoCorpus, stage: str) -> Path:
    """Stage ``stage``'s tiny recipe on the smoke corpus's sources of the same names."""
    wanted = {s.name for s in load_config(ROOT / CURRICULUM[stage].recipe).data.sources}
    sources = [s for s in corpus.sources() if s.name in wanted]
    name = f"stage{stage}"
    run = short_run(smoke, name, batch=8)
    config = {
        "include": [str(ROOT / CURRICULUM[stage].recipe)],
        **run,
        "data": data_section(corpus, sources, workers=0),
        "stage": {"init_from": None},
    }
    return write_config(smoke, name, config)


def full_width_config(smoke: Smoke, corpus: DemoCorpus) -> Path:
    """The 5B stage-1 recipe at the 5B widths (``model_5b``, 2 layers per tower) on one device."""
    sizes = smoke.sizes
    text = sizes.step_text_tokens
    lengths = {} if text is None else {"max_prompt_tokens": text, "max_target_tokens": text}
    config = {
        "include": [str(STAGE1_5B)],
        **short_run(smoke, "full_width_step", sizes.step_micro_batch),
        "model": model_5b(sizes, sizes.step_px, vit_depth=2, ul2_layers=2),
        "data": {**data_section(corpus, list(corpus.sources()), sizes.data_workers), **lengths},
        "parallel": {"tensor_parallel_size": 1, "zero_stage": 2},
        "stage": {"init_from": None},
    }
    return write_config(smoke, "full_width_step", config)


def launch_command(stage: str, config: Path) -> list[str]:
    """torchrun with one process, as tests/engine/conftest.py launches the trainer."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(ROOT / "launcher" / "run.py"),
        "--stage",
        stage,
        "--config",
        str(config),
    ]


def launch_env(device: torch.device) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if device.type == "cpu":  # gloo and CPU kernels, even on a machine with a GPU
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def run_logged(command: list[str], env: dict[str, str], log: Path, timeout: int) -> int | None:
    """Exit code of ``command`` with its output in ``log``; None if it ran past ``timeout``
    (then SIGTERM, which torchrun passes to the rank: it saves and exits, else SIGKILL)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launched_run(smoke: Smoke, name: str, stage: str, config: Path) -> dict:
    """``config`` trained by launcher/run.py, fresh (an old run there would be resumed): the
    exit code and every step's metrics. Fails unless it exits 0 with STEPS finite losses."""
    run_dir = smoke.out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command, log = launch_command(stage, config), smoke.out / f"{name}.log"
    code = run_logged(command, launch_env(smoke.device), log, smoke.sizes.launch_timeout_s)
    steps = read_metrics(run_dir)
    losses = [row["loss"] for row in steps]
    result = {
        "command": shlex.join(command),
        "config": str(config),
        "log": str(log),
        "exit_code": code,
        "losses": losses,
        "steps": steps,
    }
    if code != 0 or len(losses) != STEPS or not all(map(math.isfinite, losses)):
        ended = (
            f"timed out after {smoke.sizes.launch_timeout_s} s" if code is None else f"exit {code}"
        )
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SectionFailed(f"{ended}, losses {losses}; the end of {log}:\n{tail}", result)
    return {**result, "summary": "exit 0, losses " + ", ".join(f"{x:.4f}" for x in losses)}


def tiny_stage(smoke: Smoke, stage: str) -> dict:
    corpus = require_launch(smoke)
    return launched_run(smoke, f"stage{stage}", stage, tiny_stage_config(smoke, corpus, stage))


# ----------------------------------------------------------------------- the full-width step


def model_flops_per_sample(cfg: Config) -> float:
    """Model FLOPs (no recompute) of one training sample of ``cfg``: the one place this script
    asks ``engine.flops`` (through the stage's spec, as the trainer does)."""
    from pali3_train.stages.registry import spec_for

    return spec_for(cfg).flops(cfg).model


def listed_peak_flops(device: torch.device, cfg: Config) -> float | None:
    """The device's dense peak in the run's precision, as the trainer's MFU takes it; None for a
    device the table does not list (and on CPU)."""
    from pali3_train.engine.peak import device_peak_flops

    return device_peak_flops(device, cfg.train.precision)


def tokens_per_s(step: dict) -> float:
    """Every token the model took per second: the trainer logs each input kind apart."""
    return sum(v for k, v in step.items() if k.endswith("tokens_per_s"))


def planned_memory_gib(cfg: Config) -> dict[str, float]:
    """The dry run's estimate for ``cfg`` on one device (``engine.memory`` via ``build_plan``)."""
    from pali3_train.engine.dry_run import build_plan

    plan = build_plan(cfg, world_size=1, gpus_per_node=1)
    states, activations = plan.states.total / GiB, plan.activation_bytes / GiB
    return {"states": states, "activations": activations, "total": states + activations}


def utilisation(smoke: Smoke, cfg: Config, step: dict) -> dict:
    """Achieved model FLOP/s of ``step`` over the device's listed peak (MFU) and over the matmul
    ceiling measured above (the ``matmul`` section)."""
    achieved = model_flops_per_sample(cfg) * cfg.train.global_batch_size / step["step_time_s"]
    peak = listed_peak_flops(smoke.device, cfg)
    ceiling = smoke.results.get("matmul", {}).get("tflops")
    return {
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "of_matmul_ceiling": achieved / (ceiling * 1e12) if ceiling else None,
    }


def measured_memory(device: torch.device, step: dict) -> dict:
    """The step's peak as the trainer logged it, and what that figure is."""
    if device.type == "cuda":
        what = "torch.cuda.max_memory_allocated during the step (reserved: the allocator's)"
    else:
        what = "the rank's peak RSS during the step: includes Python and torch, not comparable"
    keys = ("memory_gib", "memory_reserved_gib")
    return {"measured_as": what, **{k: step[k] for k in keys if k in step}}


def full_width_step(smoke: Smoke) -> dict:
    corpus = require_launch(smoke)
    config = full_width_config(smoke, corpus)
    run = launched_run(smoke, "full_width_step", "1", config)
    cfg, last = load_config(config), run["steps"][-1]
    use, plan = utilisation(smoke, cfg, last), planned_memory_gib(cfg)
    mfu = "n/a (no listed peak)" if use["mfu"] is None else f"{use['mfu']:.1%}"
    ceiling = "n/a" if use["of_matmul_ceiling"] is None else f"{use['of_matmul_ceiling']:.1%}"
    shown = (
        f"{tokens_per_s(last):,.0f} tokens/s, {use['model_tflops_per_s']:.4g} TFLOP/s: "
        f"MFU {mfu}, {ceiling} of the matmul ceiling; step peak memory "
        f"{last['memory_gib']:.2f} GiB vs planned {plan['total']:.2f} GiB"
    )
    return {
        **run,
        "last_step": last,
        "tokens_per_s": tokens_per_s(last),
        "utilisation": use,
        "memory_gib": {**measured_memory(smoke.device, last), "planned": plan},
        "summary": shown,
    }


# --------------------------------------------------------------------------------- the run

SECTIONS: dict[str, Callable[[Smoke], dict]] = {
    "versions": versions,
    "matmul": matmul_ceiling,
    "copy": copy_bandwidth,
    "sdpa": sdpa,
    "corpus": corpus,
    "stage0": partial(tiny_stage, stage="0"),
    "stage1": partial(tiny_stage, stage="1"),
    "full_width_step": full_width_step,
}


def release_memory(device: torch.device) -> None:
    """Hand cached blocks back, so the launched runs get the GPU's memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_section(smoke: Smoke, name: str, section: Callable[[Smoke], dict]) -> dict:
    """The section's findings with its status and duration; any error is a finding."""
    print(f"[{name}] started", flush=True)
    start = time.perf_counter()
    try:
        result = {"status": "ran", **section(smoke)}
    except Skipped as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except SectionFailed as exc:
        result = {"status": "failed", "error": str(exc), **exc.details}
    except Exception as exc:  # one broken section must not hide what the others find
        result = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    release_memory(smoke.device)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {result['status']} in {result['seconds']} s: {outcome(result)}", flush=True)
    return result


def outcome(result: dict) -> str:
    """One line: the summary of a section that ran, else why not."""
    text = result.get("summary") or result.get("reason") or result.get("error", "")
    return text.splitlines()[0] if text else ""


def report(smoke: Smoke, seconds: float) -> dict:
    by_status = {
        s: [n for n, r in smoke.results.items() if r["status"] == s]
        for s in ("ran", "skipped", "failed")
    }
    return {
        "device": smoke.device.type,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sizes": dataclasses.asdict(smoke.sizes),
        "ran": by_status["ran"],
        "skipped": {n: smoke.results[n]["reason"] for n in by_status["skipped"]},
        "failed": {n: outcome(smoke.results[n]) for n in by_status["failed"]},
        "seconds": round(seconds, 1),
        "sections": smoke.results,
    }


def markdown(found: dict) -> str:
    """The summary: one row per section, then the attention backends per call."""
    device = found["sections"]["versions"].get("versions", {}).get("device", found["device"])
    lines = [
        f"# GPU smoke test: {device}, {found['date']} ({found['seconds']} s)",
        "",
        "| section | status | s | result |",
        "|---|---|---:|---|",
    ]
    for name, result in found["sections"].items():
        cell = outcome(result).replace("|", "\\|")
        lines.append(f"| {name} | {result['status']} | {result['seconds']} | {cell} |")
    calls = found["sections"]["sdpa"].get("calls", [])
    if calls:
        lines += [
            "",
            "| attention | px | tokens | forward | backward | kernels |",
            "|---|---:|---:|---|---|---|",
        ]
        for c in calls:
            kernels = "<br>".join(c["kernels"]) or ", ".join(c["ops"])
            lines.append(
                f"| {c['tower']} | {c['px']} | {c['tokens']:,} | "
                f"{', '.join(c['forward'])} | {', '.join(c['backward'])} | {kernels} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cuda", "cpu"), default=default)
    parser.add_argument("--out", type=Path, help="default: runs/gpu_smoke/<device>")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available())")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = (args.out or Path("runs") / "gpu_smoke" / device.type).resolve()
    out.mkdir(parents=True, exist_ok=True)
    smoke, start = Smoke(device, SIZES[device.type], out), time.perf_counter()
    for name, section in SECTIONS.items():
        smoke.results[name] = run_section(smoke, name, section)
    found = report(smoke, time.perf_counter() - start)
    (out / "gpu_smoke.json").write_text(json.dumps(found, indent=2) + "\n")
    table = markdown(found)
    (out / "gpu_smoke.md").write_text(table)
    print(f"\n{table}\nwritten: {out / 'gpu_smoke.json'}, {out / 'gpu_smoke.md'}")
    return 1 if found["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
