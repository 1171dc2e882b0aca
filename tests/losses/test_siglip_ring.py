"""The chunked ring sigmoid loss against the dense loss over the whole global batch, with real
processes: world sizes 1-4, one- and two-directional rings, fp64 (1e-6... in practice ~1e-15)
and fp32 (1e-5), and bf16 embeddings against the fp32 dense loss of the same (bf16-rounded)
values: the ring computes in fp32 whatever its inputs. Every rank runs under the device guard,
as a CUDA/NCCL rank would check devices. A negative control breaks the exchange and shows the
same check catches it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pali3_train.engine.device_guard import DeviceGuard
from pali3_train.engine.distributed import DistEnv, free_port, init_distributed
from pali3_train.losses import siglip_ring
from pali3_train.losses.siglip import sigmoid_loss

LOCAL_BATCH, DIM = 3, 5
VARIANTS = [(bidirectional, dtype) for bidirectional in (False, True)
            for dtype in (torch.float64, torch.float32, torch.bfloat16)]  # fmt: skip
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
    for bidirectional, dtype in VARIANTS:
        images, texts, scale, bias = _global_batch(world, dtype)
        images, texts, scale, bias = _leaves(images[rows], texts[rows], scale, bias)
        with DeviceGuard(torch.device("cpu")):
            loss = siglip_ring.ring_sigmoid_loss(images, texts, scale, bias, None, bidirectional)
            loss.backward()
        results[(bidirectional, str(dtype))] = {"loss": loss.detach(), "images": images.grad,
            "texts": texts.grad, "scale": scale.grad, "bias": bias.grad}  # fmt: skip
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _run(world: int, tmp_path: Path, broken: bool = False) -> list[dict]:
    mp.start_processes(_rank, (world, free_port(), str(tmp_path), broken), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _mismatches(world: int, ranks: list[dict], bidirectional: bool, dtype) -> list[str]:
    """What differs from the dense reference: the mean of the ranks' losses is the global loss;
    each rank's embedding gradients, and the sum of t' and b gradients, are n times the global
    loss's (data parallelism averages them back)."""
    want, (atol, rtol) = _dense(world, dtype), TOLERANCE[dtype]
    got = [{k: v.to(REFERENCE_DTYPE[dtype]) for k, v in r[(bidirectional, str(dtype))].items()}
           for r in ranks]  # fmt: skip
    checks = {
        "loss": (sum(g["loss"] for g in got) / world, want["loss"]),
        "images": (torch.cat([g["images"] for g in got]) / world, want["images"]),
        "texts": (torch.cat([g["texts"] for g in got]) / world, want["texts"]),
        "scale": (sum(g["scale"] for g in got) / world, want["scale"]),
        "bias": (sum(g["bias"] for g in got) / world, want["bias"]),
    }
    return [
        name
        for name, (a, b) in checks.items()
        if not torch.allclose(a, b, atol=atol, rtol=0 if name == "loss" else rtol)
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_loss_and_gradients_equal_the_dense_global_loss(world, tmp_path):
    ranks = _run(world, tmp_path)
    for bidirectional, dtype in VARIANTS:
        assert _mismatches(world, ranks, bidirectional, dtype) == [], (bidirectional, dtype)


def test_a_broken_exchange_is_caught(tmp_path):
    """Skipping the last hop leaves some image-text pairs unscored: the loss, the embedding
    gradients and t', b all disagree with the dense reference, in both ring variants."""
    ranks = _run(4, tmp_path, broken=True)
    for bidirectional, dtype in VARIANTS:
        assert {"loss", "images", "texts", "scale"} <= set(
            _mismatches(4, ranks, bidirectional, dtype)
        )


def test_the_schedule_reaches_every_other_rank_once():
    for world in range(1, 9):
        for bidirectional in (False, True):
            seen = [(d * (k + 1)) % world for k, step in enumerate(siglip_ring.hops(world,
                    bidirectional)) for d in step]  # fmt: skip
            assert sorted(seen) == list(range(1, world)), (world, bidirectional)
    assert len(siglip_ring.hops(8, True)) == 4 and len(siglip_ring.hops(8, False)) == 7


def _unequal(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(DistEnv(rank, world, rank))
    batch = 3 if rank == 0 else 2
    images = F.normalize(torch.randn(batch, DIM))
    try:
        siglip_ring.ring_sigmoid_loss(images, images, torch.zeros(1), torch.zeros(1))
        message = "accepted"
    except ValueError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)
    torch.distributed.destroy_process_group()


def test_unequal_local_batches_are_refused_on_every_rank(tmp_path):
    mp.start_processes(_unequal, (2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert (
            "equal local batches on every rank; they range from 2 to 3"
            in (tmp_path / f"rank{rank}.txt").read_text()
        )


def test_bf16_embeddings_give_an_fp32_loss_and_gradients_in_their_own_dtype(tmp_path):
    """The policy's dtypes, asserted rather than inferred from values."""
    ranks = _run(2, tmp_path)
    for bidirectional in (False, True):
        for rank in ranks:
            got = rank[(bidirectional, str(torch.bfloat16))]
            assert got["loss"].dtype == torch.float32
            assert {got[k].dtype for k in ("images", "texts", "scale", "bias")} == {torch.bfloat16}
