"""Time, peak memory and error of the token cross-entropy's paths against all logits at once.

    .venv/bin/python -m benchmarks.cross_entropy [--device cpu|cuda] [--tokens 2048]
        [--vocabs 32128 250112] [--d-model 1024] [--chunks 1024 256] [--reps 3] [--warmup 1]
        [--out benchmarks/results/cross_entropy.md]

Why: PaLI-3's loss turns [tokens, d_model] hidden states into [tokens, vocab] logits; all at once
in fp32 they and what autograd keeps of them are the largest activation of a generative step
(2,048 tokens at mT5's vocabulary of 250,112: 2 GB per logit matrix). ``kernels.cross_entropy``
chooses how many exist at once (``pali3_train.losses``): all ("plain", the reference), chunks of
``--chunks`` tokens recomputed in the backward ("chunked"), chunks whose gradients are
computed in the forward and summed in place ("fused", ``losses.fused_linear``), or
liger-kernel's fused linear cross-entropy (the same walk in Triton: "liger", CUDA only here:
Triton runs on CPU tensors only in its interpreter, ~25 s for 256 tokens at vocabulary 32k, and
no timing means anything there). The goal: a peak at most
1/4 of the plain one at 2,048 tokens and both vocabularies.

What: the forward and backward of the loss alone, from fp32 leaf hidden states [1, tokens,
d_model] through a d_model -> vocab head (the UL2 LM head: no bias, T5's initialisation) to the
mean over real target tokens (the last 1/8 of the tokens are padding), so the gradients into the
hidden states and the head weight are computed every time. Every path is compared with plain on
the same inputs: the largest absolute difference of the loss and of the two gradients.

Time: median of ``--reps`` repetitions after ``--warmup``, paths interleaved in a rotating order
(CUDA: synchronised before reading the clock).

Memory: the most the step allocates at once beyond its inputs and the gradient buffers, which
exist before it (zeroed in place, as a trainer's after its first step): the logits and what
autograd keeps of them, recomputed chunks, and the gradients' temporaries, among them each
head-gradient contribution [vocab, d_model] before it is summed into the buffer. On CUDA
``torch.cuda.max_memory_allocated``, on CPU the profiler's allocation events
(``benchmarks.allocations``); process RSS would bury it under torch's and the allocator's caches.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.allocations import peak_bytes
from pali3_train.losses.fused_linear import FusedLinearCrossEntropy
from pali3_train.losses.text import TokenLoss

MiB = 2**20
FP32 = 4
LossFn = Callable[[torch.Tensor, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Inputs:
    hidden: torch.Tensor  # [1, tokens, d_model], a leaf
    head: nn.Linear
    targets: torch.Tensor  # [1, tokens]
    mask: torch.Tensor  # [1, tokens], the last 1/8 False

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.hidden, self.head.weight]

    def zero_grad(self) -> None:
        """Gradient buffers that exist before the step, as a trainer's do after its first one."""
        for t in self.leaves:
            t.grad = torch.zeros_like(t) if t.grad is None else t.grad.zero_()


def make_inputs(tokens: int, vocab: int, d_model: int, device: torch.device) -> Inputs:
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(1, tokens, d_model, generator=g, device=device).requires_grad_()
    head = nn.Linear(d_model, vocab, bias=False, device=device)
    with torch.no_grad():
        head.weight.normal_(std=d_model**-0.5, generator=g)
    targets = torch.randint(0, vocab, (1, tokens), generator=g, device=device)
    mask = torch.arange(tokens, device=device)[None] < tokens - tokens // 8
    return Inputs(hidden, head, targets, mask)


def methods(chunks: list[int], device: torch.device) -> dict[str, LossFn]:
    found: dict[str, LossFn] = {"plain": TokenLoss()}
    found |= {f"chunked {c}": TokenLoss(chunk_tokens=c) for c in chunks}
    found |= {f"fused {c}": FusedLinearCrossEntropy(c) for c in chunks}
    if device.type == "cuda":
        from pali3_train.losses.liger import liger_token_loss  # loads triton: CUDA only

        found["liger"] = liger_token_loss
    return found


def step(fn: LossFn, x: Inputs) -> list[torch.Tensor]:
    """Forward and backward -> [loss, hidden gradient, weight gradient]."""
    x.zero_grad()
    loss = fn(x.hidden, x.head, x.targets, x.mask)
    loss.backward()
    return [loss.detach(), x.hidden.grad, x.head.weight.grad]


def seconds(fn: LossFn, x: Inputs) -> float:
    sync = torch.cuda.synchronize if x.hidden.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    step(fn, x)
    sync()
    return time.perf_counter() - start


def peak(fn: LossFn, x: Inputs) -> int:
    """Bytes the step allocated at its peak beyond what existed before it (module docstring)."""
    x.zero_grad()  # the gradient buffers exist before the measured call
    return peak_bytes(lambda: step(fn, x), x.hidden.device)


@dataclass(frozen=True)
class Row:
    vocab: int
    tokens: int
    path: str
    ms: float
    peak: int  # bytes
    loss_error: float
    grad_error: float


def measure(vocab: int, args: argparse.Namespace, device: torch.device) -> list[Row]:
    x = make_inputs(args.tokens, vocab, args.d_model, device)
    paths = methods(args.chunks, device)
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            elapsed = seconds(paths[name], x)
            if rep >= args.warmup:
                times[name].append(elapsed)
    reference = [t.clone() for t in step(paths["plain"], x)]
    rows = []
    for name, fn in paths.items():
        got = step(fn, x)
        errors = [(a - b).abs().max().item() for a, b in zip(got, reference)]
        rows.append(Row(vocab, args.tokens, name, 1e3 * statistics.median(times[name]),
                        peak(fn, x), errors[0], max(errors[1:])))  # fmt: skip
        print(f"vocab {vocab}: {name} done", flush=True)
    del x
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU with {len(os.sched_getaffinity(0))} cores"


def report(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    cuda = device.type == "cuda"
    method = "torch.cuda.max_memory_allocated" if cuda else "torch.profiler allocation events"
    lines = [
        "# Token cross-entropy: plain vs chunked vs fused vs liger",
        "",
        f"`python -m benchmarks.cross_entropy --device {device.type} --tokens {args.tokens} "
        f"--vocabs {' '.join(map(str, args.vocabs))} --d-model {args.d_model} "
        f"--chunks {' '.join(map(str, args.chunks))} --reps {args.reps} --warmup {args.warmup}`",
        "",
        f"Forward + backward of the loss alone (hidden states -> LM head -> mean cross-entropy "
        f"over real tokens; 1/8 padding), fp32, d_model {args.d_model}; median of {args.reps} "
        f"after {args.warmup} warm-up; peak = the most bytes the step allocated at once beyond its "
        f"inputs and the gradient buffers ({method}); "
        f"error = max |difference| from plain in the same run. {device_name(device)}, "
        f"torch {torch.__version__}.",
        "",
        "| vocab | tokens | path | fwd+bwd ms | time / plain | peak MiB | peak / plain | "
        "max error loss | max error grads |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        plain = next(p for p in rows if p.vocab == r.vocab and p.path == "plain")
        lines.append(
            f"| {r.vocab:,} | {r.tokens:,} | {r.path} | {r.ms:.0f} | {r.ms / plain.ms:.2f}x | "
            f"{r.peak / MiB:.0f} | {r.peak / plain.peak:.3f} | {r.loss_error:.1e} | "
            f"{r.grad_error:.1e} |"
        )
    vocabs = sorted({r.vocab for r in rows})
    head_grad = {v: v * args.d_model * FP32 for v in vocabs}

    def in_heads(prefix: str) -> str:
        found = [r for r in rows if r.path.startswith(prefix)]
        return ", ".join(
            f"{r.peak / head_grad[r.vocab]:.2f} ({r.path}, {r.vocab:,})" for r in found
        )

    lines += [
        "",
        "One fp32 logit matrix [tokens, vocab]: "
        + ", ".join(f"{args.tokens * v * FP32 / MiB:.0f} MiB at {v:,}" for v in vocabs)
        + "; one head gradient [vocab, d_model]: "
        + ", ".join(f"{head_grad[v] / MiB:.0f} MiB" for v in vocabs)
        + ". Chunked peaks in head gradients: "
        + in_heads("chunked")
        + ": autograd sums the chunks' head-gradient contributions as they come (the first two "
        "out of place), so about three [vocab, d_model] tensors exist at once besides the "
        "chunk's logits. Fused peaks in head gradients: "
        + in_heads("fused")
        + ": one accumulator, summed into in place, one chunk's logits (each a head gradient "
        "when the chunk has d_model tokens) and the input gradient.",
    ]
    if not cuda:
        lines.append(
            "liger: not measured on CPU (its Triton kernels run there only in the interpreter; "
            "its loss and gradients are checked against plain in tests/losses/test_liger.py)."
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32128, 250112])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    rows: list[Row] = []
    for vocab in args.vocabs:  # the report so far after each vocabulary: a long run keeps them
        rows += measure(vocab, args, device)
        text = report(rows, args, device)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
