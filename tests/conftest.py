"""Shared test settings: deterministic, single-threaded-friendly torch."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
