"""Shared test settings: deterministic, single-threaded-friendly torch."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at first import; without this it may look for CUDA.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
