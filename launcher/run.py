"""Train one curriculum stage on every process that the launcher started.

    deepspeed launcher/run.py --stage 1 --config configs/stage1_tiny.yaml
    torchrun --nproc_per_node 2 launcher/run.py --stage 1 --config ... --set train.lr=3e-4
    srun python launcher/run.py --stage 1 --config ...        (cluster/ sets MASTER_ADDR/PORT)

The whole config, the parallel layout and the data sources are checked before any process group
starts, so a bad run fails at once on every rank with one message and exit code 2. Exit codes:
0 finished, 75 stopped by SIGTERM/SIGUSR1 after saving (requeue and ``--resume auto``), 1 failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from data_pipeline.loader import resolve_sources
from pali3_train.config import Config, ConfigError, load_config_or_exit
from pali3_train.engine.checkpoint import CheckpointError, resolve
from pali3_train.engine.deepspeed_config import accumulation_steps
from pali3_train.engine.distributed import DistEnv, init_distributed, read_env
from pali3_train.tokenizer import Tokenizer

STAGES = ("0", "1", "2", "transfer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True, help="stage YAML (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    parser.add_argument("--resume", default="auto", help="auto | none | a checkpoint folder")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def check_before_start(cfg: Config, env: DistEnv, args: argparse.Namespace) -> None:
    """Everything that can be refused without a process group: layout, batch, data, resume."""
    tp = cfg.parallel.tensor_parallel_size
    if env.world_size % tp:
        raise ConfigError(
            args.config,
            "parallel.tensor_parallel_size",
            f"{tp} does not divide the world size {env.world_size}",
        )
    accumulation_steps(cfg, env.world_size // tp, args.config)
    resolve_sources(cfg.data, args.config)
    if cfg.eval.sources:
        resolve_sources(replace(cfg.data, sources=cfg.eval.sources), args.config, "eval.sources")
    if args.stage == "0" and cfg.data.max_target_tokens > cfg.model.text.max_len:
        raise ConfigError(
            args.config,
            "data.max_target_tokens",
            f"{cfg.data.max_target_tokens} exceeds the text tower's "
            f"model.text.max_len={cfg.model.text.max_len} (stage 0 encodes targets)",
        )
    vocab = Tokenizer.load(cfg.data.tokenizer_path).vocab_size
    if vocab > cfg.model.ul2.vocab_size:
        raise ConfigError(
            args.config,
            "model.ul2.vocab_size",
            f"{cfg.model.ul2.vocab_size} is smaller than the tokenizer's {vocab}",
        )
    try:
        resolve(args.resume, Path(cfg.checkpoint_dir))
    except CheckpointError as exc:
        raise ConfigError("--resume", "", str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.set)
    env = read_env()
    try:
        check_before_start(cfg, env, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"[rank {env.rank}] %(levelname)s %(name)s: %(message)s",
    )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    from pali3_train.engine.trainer import EXIT_FAILED, Trainer, TrainingError
    from pali3_train.parallel import ParallelDims, destroy_model_parallel, init_model_parallel

    device = init_distributed(env)
    dims = ParallelDims(env.world_size, cfg.parallel.tensor_parallel_size)
    init_model_parallel(dims)
    try:
        return Trainer(cfg, args.stage, env, device, dims, args.resume).run()
    except TrainingError as exc:
        logging.getLogger("launcher").error("%s", exc)
        return EXIT_FAILED
    finally:
        destroy_model_parallel()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
