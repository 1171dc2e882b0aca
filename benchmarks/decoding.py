"""Decoding speed with and without the decoder's key/value cache, measured in the same run.

    .venv/bin/python benchmarks/decoding.py [--model configs/models/small.yaml] [--max-len 32]

Prints one row per (beam size) with the uncached time as the baseline and the cache's speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from pali3_train.config import load_config
from pali3_train.models import UL2
from pali3_train.models.decoding import beam_search


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="configs/models/small.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = load_config(args.model).model.ul2
    model = UL2(cfg).eval()
    inputs = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len))
    mask = torch.ones_like(inputs, dtype=torch.bool)
    with torch.no_grad():
        memory = model.encode(model.embed(inputs), mask)

    print(
        f"model={args.model} batch={args.batch} prompt={args.prompt_len} "
        f"max_len={args.max_len} threads={torch.get_num_threads()}"
    )
    print(f"{'beam':>5}{'steps':>7}{'uncached s':>12}{'cached s':>10}{'speed-up':>10}")
    for beam in (1, 4):

        def run(cache: bool, beam: int = beam) -> torch.Tensor:
            return beam_search(model, memory, mask, args.max_len, beam, use_cache=cache).tokens

        steps = run(True).shape[1]  # random weights rarely emit EOS, so usually max_len
        uncached, cached = (
            _time(lambda: run(False), args.repeats),
            _time(lambda: run(True), args.repeats),
        )
        print(f"{beam:>5}{steps:>7}{uncached:>12.3f}{cached:>10.3f}{uncached / cached:>9.1f}x")


if __name__ == "__main__":
    main()
