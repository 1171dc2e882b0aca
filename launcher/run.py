"""Train one curriculum stage on every process that the launcher started.

    deepspeed launcher/run.py --stage 1 --config configs/tiny/stage1.yaml
    torchrun --nproc_per_node 2 launcher/run.py --stage 1 --config ... --set train.lr=3e-4
    srun python launcher/run.py --stage 1 --config ...        (cluster/ sets MASTER_ADDR/PORT)

The whole config, the parallel layout and the data sources are checked before any process group
starts, so a bad run fails at once on every rank with one message and exit code 2. Exit codes:
0 finished, 75 stopped by SIGTERM/SIGUSR1 after saving (requeue and ``--resume auto``), 1 failed.
``--dry-run [--world-size N]`` runs those checks and prints the plan (layout, batch, parameters,
memory per device) without starting anything: 0 if a start would pass them, 2 if not.
``--eval-only`` scores the model as built or restored on ``eval.sources`` (a baseline).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from pali3_train.config import Config, ConfigError, add_overrides_option, load_config_or_exit
from pali3_train.engine.distributed import DistEnv, init_distributed, read_env
from pali3_train.engine.plan import check_data, check_layout, check_resume, dry_run

STAGES = ("0", "1", "2", "transfer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True, help="stage YAML (see configs/)")
    add_overrides_option(parser)
    parser.add_argument("--resume", default="auto", help="auto | none | a checkpoint folder")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--eval-only", action="store_true", help="evaluate, do not train")
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    parser.add_argument("--world-size", type=int, help="dry run: devices (default: environment)")
    parser.add_argument("--gpus-per-node", type=int, help="dry run: devices per node (default 8)")
    args = parser.parse_args(argv)
    for name in ("world_size", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and not args.dry_run:
            parser.error(f"--{name.replace('_', '-')} is only for --dry-run")
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def check_before_start(cfg: Config, env: DistEnv, args: argparse.Namespace) -> None:
    """Everything that can be refused without a process group: layout, batch, data, resume."""
    check_layout(cfg, args.stage, env.world_size, args.config)
    check_data(cfg, args.config)
    check_resume(cfg, args.resume)
    if cfg.stage.init_from and not Path(cfg.stage.init_from).is_file():
        missing = f"{cfg.stage.init_from} does not exist: run the previous stage first"
        raise ConfigError(args.config, "stage.init_from", missing)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.set)
    env = read_env()
    if args.dry_run:
        world = args.world_size or env.world_size
        return dry_run(cfg, args.stage, args.config, args.resume, world, args.gpus_per_node or 8)
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
        trainer = Trainer(cfg, args.stage, env, device, dims, args.resume)
        return trainer.evaluate_only() if args.eval_only else trainer.run()
    except TrainingError as exc:
        logging.getLogger("launcher").error("%s", exc)
        return EXIT_FAILED
    finally:
        destroy_model_parallel()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
