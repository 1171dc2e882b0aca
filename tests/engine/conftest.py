"""Real runs of `launcher/run.py` under torchrun on CPU, on a small generated demo corpus."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pali3_train.engine.distributed import DistEnv, free_port, init_distributed

ROOT = Path(__file__).resolve().parents[2]


def stage_config(demo, run_dir: Path, **sections) -> Path:
    """A stage-1 config for the tiny model on ``demo``, written beside ``run_dir``."""
    data = {
        "tokenizer_path": str(demo.tokenizer_path),
        "sources": [dataclasses.asdict(s) for s in demo.sources()],
        "max_prompt_tokens": 16,
        "max_target_tokens": 16,
        "num_workers": 0,
    }
    config = {
        "include": [str(ROOT / "configs" / "base.yaml"), str(ROOT / "configs/models/tiny.yaml")],
        "run_dir": str(run_dir),
        "data": data,
        "train": {
            "steps": 6,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
        },
        "parallel": {"zero_stage": 2},
        "tracking": {"backend": "none"},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "stage": {"freeze": ["vit"]},
    }
    for section, values in sections.items():
        config[section] = (
            {**config.get(section, {}), **values} if isinstance(values, dict) else values
        )
    path = run_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def launch_command(config: Path, nproc: int, *args: str, stage: str = "1") -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "launcher" / "run.py"),
        "--stage",
        stage,
        "--config",
        str(config),
        *args,
    ]


def launch_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def launch(config: Path, nproc: int, *args: str, stage: str = "1", timeout: int = 300):
    return subprocess.run(
        launch_command(config, nproc, *args, stage=stage),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def launch_together(*runs: tuple[Path, int], timeout: int = 300):
    """``launch(config, nproc)`` for each (config, nproc) at once, side by side; returns their
    CompletedProcesses in order. For independent runs whose ranks together need no more cores than
    there are: each rank is one thread (OMP_NUM_THREADS=1), and start-up is single-threaded."""
    import tempfile

    started = []
    for config, nproc in runs:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        command = launch_command(config, nproc)
        process = subprocess.Popen(command, env=launch_env(), cwd=ROOT, stdout=out, stderr=err,
                                   text=True)  # fmt: skip
        started.append((command, process, out, err))
    results = []
    try:
        for command, process, out, err in started:
            process.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            results.append(
                subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
            )
    finally:
        for _, process, out, err in started:
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close(), err.close()
    return results


@pytest.fixture
def one_rank(monkeypatch):
    """This process as a one-rank world (real gloo group, megatron state): (env, device, dims)."""
    from pali3_train.parallel import ParallelDims, destroy_model_parallel, init_model_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    env = DistEnv(0, 1, 0)
    device = init_distributed(env)
    dims = ParallelDims(1, 1)
    init_model_parallel(dims)
    yield env, device, dims
    destroy_model_parallel()
    torch.distributed.destroy_process_group()
