"""Shared test settings (deterministic torch, DeepSpeed on the CPU), the tiny demo corpora, and a
real MLflow server (the tracking tests and the engine's launcher tests log to it)."""

import os
from pathlib import Path

import pytest
import torch

from pali3_train.data_pipeline.demo_corpus import build_demo_corpus
from tests.mlflow_server import MlflowServer

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
def reference(demo, tmp_path_factory):
    """An uninterrupted 2-process ZeRO-2 run of 6 steps, checkpointing every 2 (the engine's
    tests read it; the fault campaign copies it as its uninterrupted run)."""
    from tests.engine.conftest import launch, stage_config

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = launch(stage_config(demo, run_dir), 2)
    assert result.returncode == 0, result.stderr[-5000:]
    (run_dir.parent / "output.txt").write_text(result.stdout + result.stderr)  # test_quiet.py
    return run_dir


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server on a free port; yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    finally:
        server.stop()
