"""liger-kernel's fused linear cross-entropy against all logits at once: loss and gradients into
the hidden states and the head (fp32, 1e-5), on a head alone and on PaLI-3 through
``apply_kernels``, with padding and an odd token count.

Its Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1``, which triton reads when
it is first imported: the liger side runs in a fresh interpreter with it set (this process may
have imported triton already), and sends its results back in a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pali3_train.losses.text import TokenLoss
from tests.losses.test_text import (
    TOL,
    _head_inputs,
    _loss_and_grads,
    _odd_batch,
    _pali3_loss_and_grads,
)
from tests.parallel.helpers import tiny_pali3

ROOT = Path(__file__).resolve().parents[2]

# Run in the fresh interpreter: the same inputs as the tests build here (same seeds).
LIGER_SIDE = """
import sys, torch
from pali3_train.kernels import apply_kernels
from pali3_train.losses.liger import liger_token_loss
from tests.losses.test_text import (
    _head_inputs, _loss_and_grads, _odd_batch, _pali3_loss_and_grads, resolved
)
from tests.parallel.helpers import tiny_pali3

model = apply_kernels(tiny_pali3(), resolved(cross_entropy="liger"))
pali3 = _pali3_loss_and_grads(model, _odd_batch(model.cfg))
pali3["grads"] = {n: p.grad for n, p in model.named_parameters()}
torch.save({
    "head": _loss_and_grads(liger_token_loss, *_head_inputs()),
    "pali3": pali3,
    "token_loss": model.token_loss.__name__,
}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def liger(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("liger") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", LIGER_SIDE, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def test_liger_matches_all_logits_on_a_head(liger):
    expected = _loss_and_grads(TokenLoss(), *_head_inputs())
    for got, want, what in zip(liger["head"], expected, ["loss", "hidden", "weight", "bias"]):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, w=what: f"{w}: {m}")


def test_liger_matches_all_logits_on_pali3(liger):
    assert liger["token_loss"] == "liger_token_loss", "apply_kernels chose liger"
    full = tiny_pali3()
    expected = _pali3_loss_and_grads(full, _odd_batch(full.cfg))
    got = liger["pali3"]
    torch.testing.assert_close(got["loss"], expected["loss"], **TOL)
    torch.testing.assert_close(got["hidden"], expected["hidden"], **TOL)
    for name, p in full.named_parameters():
        grad = got["grads"][name]
        torch.testing.assert_close(grad, p.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
