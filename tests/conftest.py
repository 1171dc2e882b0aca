"""Shared test settings (deterministic torch, DeepSpeed on the CPU), the tiny demo corpora, and a
real MLflow server (the tracking tests and the engine's launcher tests log to it)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from data_pipeline.demo_corpus import build_demo_corpus
from pali3_train.engine.distributed import free_port

# Every run the suite starts, in this process or in the ranks it launches, checks that tensors
# meet collectives and each other on the engine's device (pali3_train.engine.device_guard).
os.environ.setdefault("PALI3_DEVICE_GUARD", "1")

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at first import; without this it may look for CUDA.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_corpus(folder: Path, samples: int, split: str = "train"):
    """Shards at the tiny preset's 32 px, a tokenizer within its 1024-piece vocabulary."""
    return build_demo_corpus(folder, samples_per_source=samples, samples_per_shard=16,
                             image_size_px=32, vocab_size=1024, split=split)  # fmt: skip


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return _tiny_corpus(tmp_path_factory.mktemp("demo"), 96)


@pytest.fixture(scope="session")
def demo_held_out(tmp_path_factory):
    return _tiny_corpus(tmp_path_factory.mktemp("held_out"), 32, split="held_out")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server on a free port; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # quicker stop
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up in 60 s: {(root / 'server.log').read_text()}")
            time.sleep(0.2)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server_log.close()
