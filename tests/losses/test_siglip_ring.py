"""The chunked ring sigmoid loss against the dense loss over the whole global batch, with real
processes: world sizes 1-5, both block kernels (plain and fused), one- and two-directional rings,
fp64 (1e-6... in practice ~1e-15) and fp32 (1e-5), and bf16 embeddings against the fp32 dense
loss of the same (bf16-rounded) values: the ring computes in fp32 whatever its inputs. The loss
is also checked without autograd (the fused kernel then skips its gradients), and the fused
kernel's peak memory is counted in b x b fp32 buffers. Every rank runs under the device guard,
as a CUDA/NCCL rank would check devices. A negative control breaks the exchange and shows the
same check catches it. Each world runs once (``_run`` is cached) and serves every test."""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.allocations import peak_bytes
from pali3_train.config import load_config
from pali3_train.engine.device_guard import DeviceGuard
from pali3_train.engine.distributed import DistEnv, free_port, init_distributed
from pali3_train.kernels import PLAIN, apply_kernels
from pali3_train.losses import siglip_ring
from pali3_train.losses.siglip import sigmoid_loss
from pali3_train.models import SigLIP
from pali3_train.stages import contrastive

LOCAL_BATCH, DIM = 3, 5
KERNELS = ("plain", "fused")
VARIANTS = [(kernel, bidirectional, dtype) for kernel in KERNELS for bidirectional in (False, True)
            for dtype in (torch.float64, torch.float32, torch.bfloat16)]  # fmt: skip
# The memory count: a local batch whose b x b blocks dwarf everything else the step allocates.
MEMORY_BATCH = 128
MEMORY_WORLDS = (2, 3)  # one hop; two directions at once (the profiler costs seconds a rank)
BLOCK_BYTES = MEMORY_BATCH**2 * 4
# (absolute, relative). bf16: the inputs are rounded and the loss is fp32 arithmetic on them, as
# the reference is (1e-5); the gradients are fp32 sums rounded once to bf16 on the way out, so
# they are within bf16's half-ulp (2^-8 relative), twice that for a sum over two ranks.
TOLERANCE = {torch.float64: (1e-6, 0), torch.float32: (1e-5, 0), torch.bfloat16: (1e-5, 2**-7)}
REFERENCE_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32,
                   torch.bfloat16: torch.float32}  # fmt: skip


def _global_batch(world: int, dtype: torch.dtype):
    """Normalised embeddings of the global batch, t' and b: the same tensors on every process.
    Some texts repeat an image's direction so that positives and negatives both matter."""
    g = torch.Generator().manual_seed(world)
    images = F.normalize(torch.randn(world * LOCAL_BATCH, DIM, generator=g, dtype=torch.float64))
    texts = F.normalize(images + 0.5 * torch.randn(images.shape, generator=g, dtype=torch.float64))
    scale = torch.tensor([2.3], dtype=torch.float64)  # t = 10
    bias = torch.tensor([-4.0], dtype=torch.float64)
    return [t.to(dtype) for t in (images, texts, scale, bias)]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _dense(world: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole (n b) x (n b) logit matrix, on the values the ring
    sees (bf16-rounded for bf16) in fp32 or fp64 arithmetic."""
    inputs = [t.to(REFERENCE_DTYPE[dtype]) for t in _global_batch(world, dtype)]
    images, texts, scale, bias = _leaves(*inputs)
    loss = sigmoid_loss(images, texts, scale, bias)
    loss.backward()
    return {"loss": loss.detach(), "images": images.grad, "texts": texts.grad,
            "scale": scale.grad, "bias": bias.grad}  # fmt: skip


def _rank(rank: int, world: int, port: int, out: str, broken: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(DistEnv(rank, world, rank))
    if broken:  # the negative control: the last hop never happens
        full = siglip_ring.hops
        siglip_ring.hops = lambda n, bidirectional: full(n, bidirectional)[:-1]
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for kernel, bidirectional, dtype in VARIANTS:
        images, texts, scale, bias = _global_batch(world, dtype)
        images, texts, scale, bias = _leaves(images[rows], texts[rows], scale, bias)
        args = (None, bidirectional, kernel)
        with DeviceGuard(torch.device("cpu")):
            loss = siglip_ring.ring_sigmoid_loss(images, texts, scale, bias, *args)
            loss.backward()
            with torch.no_grad():
                eval_loss = siglip_ring.ring_sigmoid_loss(images, texts, scale, bias, *args)
        results[(kernel, bidirectional, str(dtype))] = {"loss": loss.detach(),
            "eval_loss": eval_loss, "images": images.grad, "texts": texts.grad,
            "scale": scale.grad, "bias": bias.grad}  # fmt: skip
    if not broken and world in MEMORY_WORLDS:
        results["peak_blocks"] = _peak_blocks(rank)
    if not broken and world == 2:
        results["unequal"] = _unequal(rank)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _peak_blocks(rank: int) -> dict[tuple[str, bool], float]:
    """The peak bytes of each kernel's forward + backward in fp32 at MEMORY_BATCH, in b x b fp32
    buffers, as the benchmark measures them."""
    g = torch.Generator().manual_seed(rank)
    embeddings = F.normalize(torch.randn(2, MEMORY_BATCH, DIM, generator=g))
    inputs = _leaves(*embeddings, torch.tensor([2.3]), torch.tensor([-4.0]))
    peaks = {}
    for kernel in KERNELS:
        for bidirectional in (False, True):
            step = functools.partial(_step, inputs, bidirectional, kernel)
            peaks[(kernel, bidirectional)] = peak_bytes(step, torch.device("cpu")) / BLOCK_BYTES
    return peaks


def _step(inputs: list[torch.Tensor], bidirectional: bool, kernel: str) -> None:
    siglip_ring.ring_sigmoid_loss(*inputs, None, bidirectional, kernel).backward()


@functools.cache
def _run(world: int, broken: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, (world, free_port(), out, broken), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return [torch.load(Path(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _mismatches(world: int, ranks: list[dict], variant: tuple) -> list[str]:
    """What differs from the dense reference: the mean of the ranks' losses (with and without
    autograd) is the global loss; each rank's embedding gradients, and the sum of t' and b
    gradients, are n times the global loss's (data parallelism averages them back)."""
    kernel, bidirectional, dtype = variant
    want, (atol, rtol) = _dense(world, dtype), TOLERANCE[dtype]
    got = [{k: v.to(REFERENCE_DTYPE[dtype]) for k, v in r[(kernel, bidirectional, str(dtype))]
            .items()} for r in ranks]  # fmt: skip
    checks = {
        "loss": (sum(g["loss"] for g in got) / world, want["loss"]),
        "eval_loss": (sum(g["eval_loss"] for g in got) / world, want["loss"]),
        "images": (torch.cat([g["images"] for g in got]) / world, want["images"]),
        "texts": (torch.cat([g["texts"] for g in got]) / world, want["texts"]),
        "scale": (sum(g["scale"] for g in got) / world, want["scale"]),
        "bias": (sum(g["bias"] for g in got) / world, want["bias"]),
    }
    return [
        name
        for name, (a, b) in checks.items()
        if not torch.allclose(a, b, atol=atol, rtol=0 if name.endswith("loss") else rtol)
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_ring_loss_and_gradients_equal_the_dense_global_loss(world):
    ranks = _run(world)
    for variant in VARIANTS:
        assert _mismatches(world, ranks, variant) == [], variant


def test_a_broken_exchange_is_caught():
    """Skipping the last hop leaves some image-text pairs unscored: the loss, the embedding
    gradients and t', b all disagree with the dense reference, in every ring variant."""
    ranks = _run(4, broken=True)
    for variant in VARIANTS:
        assert {"loss", "eval_loss", "images", "texts", "scale"} <= set(
            _mismatches(4, ranks, variant)
        ), variant


@pytest.mark.parametrize("world", MEMORY_WORLDS)
def test_fused_blocks_hold_at_most_three_b_by_b_buffers(world):
    """The peak of a whole forward + backward on every rank, in b x b fp32 buffers: the fused
    kernel stays within 3 (it holds 2 at most: the logits and the softplus's output); the plain
    kernel, measured the same way, exceeds it, so the count can fail."""
    for rank in _run(world):
        peaks = rank["peak_blocks"]
        for bidirectional in (False, True):
            assert peaks[("fused", bidirectional)] <= 3, (world, bidirectional, peaks)
            assert peaks[("plain", bidirectional)] > 4, (world, bidirectional, peaks)


def test_the_schedule_reaches_every_other_rank_once():
    for world in range(1, 9):
        for bidirectional in (False, True):
            seen = [(d * (k + 1)) % world for k, step in enumerate(siglip_ring.hops(world,
                    bidirectional)) for d in step]  # fmt: skip
            assert sorted(seen) == list(range(1, world)), (world, bidirectional)
    assert len(siglip_ring.hops(8, True)) == 4 and len(siglip_ring.hops(8, False)) == 7


def _unequal(rank: int) -> str:
    """What the loss says when rank 0 holds 3 pairs and the others 2."""
    images = F.normalize(torch.randn(3 if rank == 0 else 2, DIM))
    try:
        siglip_ring.ring_sigmoid_loss(images, images, torch.zeros(1), torch.zeros(1))
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_unequal_local_batches_are_refused_on_every_rank():
    for rank in _run(2):
        assert "equal local batches on every rank; they range from 2 to 3" in rank["unequal"]


def test_bf16_embeddings_give_an_fp32_loss_and_gradients_in_their_own_dtype():
    """The policy's dtypes, asserted rather than inferred from values."""
    for kernel, bidirectional, dtype in VARIANTS:
        if dtype != torch.bfloat16:
            continue
        for rank in _run(2):
            got = rank[(kernel, bidirectional, str(dtype))]
            assert got["loss"].dtype == torch.float32
            assert {got[k].dtype for k in ("images", "texts", "scale", "bias")} == {torch.bfloat16}


def test_an_unknown_kernel_is_refused():
    images = F.normalize(torch.randn(2, DIM))
    with pytest.raises(ValueError, match="ring loss kernel 'triton'"):
        siglip_ring.ring_sigmoid_loss(
            images, images, torch.zeros(1), torch.zeros(1), kernel="triton"
        )


def test_apply_kernels_sets_the_ring_kernel_the_contrastive_forward_uses(monkeypatch):
    """``kernels.ring_loss`` reaches the loss call: the model defaults to plain, apply_kernels
    sets the choice, and ContrastiveSigLIP's forward hands it to the ring loss."""
    import pali3_train.parallel

    calls = []
    monkeypatch.setattr(pali3_train.parallel, "dp_group", lambda: None)
    monkeypatch.setattr(contrastive, "ring_sigmoid_loss", lambda *a, **kw: calls.append(kw))
    model = contrastive.ContrastiveSigLIP(load_config("configs/models/tiny.yaml").model)
    assert model.ring_loss == "plain"
    for kernel in KERNELS:
        apply_kernels(model, dataclasses.replace(PLAIN, ring_loss=kernel))
        model(torch.zeros(2, 3, 32, 32), torch.zeros(2, 8, dtype=torch.long))
    assert [kw["kernel"] for kw in calls] == list(KERNELS)
    assert isinstance(model, SigLIP)
