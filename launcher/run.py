"""Train one curriculum stage on every process that the launcher started.

    deepspeed launcher/run.py --stage 1                     (the tiny recipe on the demo corpus)
    deepspeed launcher/run.py --config configs/tiny/stage1.yaml
    torchrun --nproc_per_node 2 launcher/run.py --config ... --set train.lr=3e-4
    srun python launcher/run.py --config ...                (cluster/ sets MASTER_ADDR/PORT)

What trains is the config's ``stage:`` section; ``--stage`` is optional with a config and must
then agree with it. Without ``--config``, ``--stage S`` trains S's tiny recipe (``quickstart``).
The whole config, the parallel layout, the data, ``stage.freeze`` (on a meta-device model) and
``--resume`` are checked before any process group starts: a bad run fails within seconds with one
line, ``error: <file or --set item>: <field>: <message>``, printed by rank 0 (and by the first
rank of each further node: its own file system), and exit code 2 on every rank. Exit codes:
0 finished, 2 refused, 75 stopped by SIGTERM/SIGUSR1 after saving (requeue and ``--resume auto``),
1 failed. ``deepspeed`` and ``srun`` exit with their ranks' 2; torchrun (2.x) turns any failed
rank into its own ``ChildFailedError`` and exits 1, whatever the code (its summary shows
``exitcode : 2``): run ``--dry-run`` first where a script needs the 2 (``launcher/README.md``).
``--resume none`` where a run already trained (checkpoints, metrics, an MLflow store) is refused
unless ``--overwrite`` is given, which moves the old run aside (``engine.previous_run``).
Once the ranks are up, rank 0 takes the run directory's lock (``engine.run_lock``: a second job
there is refused, exit 2, its holder named); each rank dies with the launcher that started it
(``engine.lifeline``); a resumed checkpoint's files are checked against their SHA-256 and read
without unpickling code unless ``--trust-checkpoint`` (``engine.checkpoint``).
``--dry-run [--world-size N]`` runs those checks and prints the plan (layout, batch, parameters,
memory per device) without starting anything: 0 if a start would pass them, 2 if not.
``--eval-only`` scores the model as built or restored on ``eval.sources`` (a baseline).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from pali3_train.cli import command_parser
from pali3_train.config import Config, ConfigError, add_overrides_option
from pali3_train.config.loader import load_with_sources, one_line
from pali3_train.engine.checks import check_before_start, check_stage_flag
from pali3_train.engine.distributed import DistEnv, MainRankFailed, init_distributed, read_env
from pali3_train.engine.dry_run import dry_run
from pali3_train.engine.lifeline import die_with_parent
from pali3_train.engine.peak import enable_tf32
from pali3_train.engine.previous_run import move_aside, previous_run
from pali3_train.engine.run_lock import RunLocked, lock_run_dir
from pali3_train.launcher.quickstart import quickstart
from pali3_train.quiet import configure_logging
from pali3_train.stages.curriculum import CURRICULUM

REFUSAL_GRACE_S = 3.0  # how long a silent refusing rank waits, so rank 0's exit is seen first


def refuse(message: str, env: DistEnv) -> int:
    """One ``error:`` line, printed by rank 0 (and the first rank of each other node); every
    rank refuses alike, so the others stay silent and outwait rank 0's exit (which the launcher
    sees first and reports). Returns the exit code, 2."""
    if env.local_rank == 0:
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    if not env.is_main:
        time.sleep(REFUSAL_GRACE_S)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one ``error: argument --x: ...`` line (no usage block), once,
    exit code 2."""

    def error(self, message: str):
        sys.exit(refuse(message, read_env()))


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("launcher/run.py", __doc__, OneLineParser)
    parser.add_argument("--stage", choices=tuple(CURRICULUM), help="checked against the config")
    parser.add_argument("--config", help="stage YAML (see configs/); default: --stage's recipe")
    add_overrides_option(parser)
    parser.add_argument(
        "--resume", default="auto", help="auto (the newest valid checkpoint), none, or a folder"
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume none: move the run in run_dir aside")  # fmt: skip
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="let the resumed checkpoint unpickle any type (only for a "
                        "checkpoint from a source you trust)")  # fmt: skip
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--eval-only", action="store_true", help="evaluate, do not train")
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    parser.add_argument(
        "--verbose", action="store_true", help="DeepSpeed's and megatron-core's own logs too"
    )
    parser.add_argument("--world-size", type=int, help="dry run: devices (default: environment)")
    parser.add_argument("--gpus-per-node", type=int, help="dry run: devices per node (default 8)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None and args.stage is None:
        parser.error("give --config, or --stage alone for that stage's tiny recipe")
    if args.overwrite and (args.resume != "none" or args.eval_only):
        parser.error("--overwrite goes with --resume none (a training run that starts over)")
    for name in ("world_size", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and not args.dry_run:
            parser.error(f"--{name.replace('_', '-')} is only for --dry-run")
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def load_stage_config(args: argparse.Namespace, env: DistEnv) -> Config:
    """The config to run (``--stage`` alone: its tiny recipe), checked against ``--stage`` and
    named by it."""
    if args.config is None:
        world = args.world_size or env.world_size
        args.config, args.set = quickstart(args.stage, args.set, world, env.is_main,
                                           build_corpora=not args.dry_run)  # fmt: skip
    # args.config becomes a ConfigSource: a str that also knows each field's origin, so that
    # every check's error names the file or --set item the field came from.
    cfg, args.config = load_with_sources(args.config, args.set)
    return check_stage_flag(cfg, args.stage, args.config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun or deepspeed: die with it (engine.lifeline)
        die_with_parent()
    env = read_env()
    try:
        cfg = load_stage_config(args, env)
        if args.dry_run:
            world = args.world_size or env.world_size
            return dry_run(cfg, args.config, args.resume, world, args.gpus_per_node or 8,
                           args.overwrite)  # fmt: skip
        training = not args.eval_only
        warnings = check_before_start(cfg, env.world_size, args.config, args.resume, training,
                                      args.overwrite)  # fmt: skip
    except ConfigError as exc:
        return refuse(str(exc), env)
    for warning in warnings if env.is_main else ():
        print(f"warning: {args.config}: {warning}", file=sys.stderr)
    configure_logging(env.rank, env.is_main, args.verbose)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    from pali3_train.engine.checkpoint import CheckpointError
    from pali3_train.engine.init_from import InitError
    from pali3_train.engine.trainer import EXIT_FAILED, Trainer, TrainingError
    from pali3_train.parallel import ParallelDims, destroy_model_parallel, init_model_parallel

    device = init_distributed(env, cfg.parallel.collective_timeout_s)
    try:
        lock = lock_run_dir(Path(cfg.run_dir), env.is_main)
    except RunLocked as exc:
        torch.distributed.destroy_process_group()
        return refuse(str(exc), env)
    if args.overwrite and env.is_main:  # holding the lock: no live run's files are moved
        replace_previous_run(cfg, Path(args.config))
    enable_tf32(device)  # fp32 runs' matmuls on tensor cores (their MFU then uses TF32's peak)
    dims = ParallelDims(env.world_size, cfg.parallel.tensor_parallel_size)
    init_model_parallel(dims, cfg.parallel.collective_timeout_s)
    try:
        trainer = Trainer(cfg, env, device, dims, args.resume, args.trust_checkpoint)
        return trainer.evaluate_only() if args.eval_only else trainer.run()
    except (TrainingError, InitError, CheckpointError) as exc:
        logging.getLogger("launcher").error("%s", exc)
        return EXIT_FAILED
    except MainRankFailed:  # rank 0 reports the cause
        return EXIT_FAILED
    finally:
        if lock is not None:
            lock.release()
        destroy_model_parallel()
        torch.distributed.destroy_process_group()


def replace_previous_run(cfg: Config, config: Path) -> None:
    """``--overwrite``: the previous run moved aside, said in one warning line."""
    found = previous_run(cfg)
    if found:
        moved = ", ".join(str(p) for p in move_aside(cfg, keep=(config,)))
        print(f"warning: --overwrite: the previous run in {cfg.run_dir} ({', '.join(found)}) "
              f"moved to {moved}; starting over", file=sys.stderr, flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
