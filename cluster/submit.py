"""Submit a training stage to Slurm: config -> checked request -> sbatch script -> job.

    python -m cluster.submit --stage 1 --config configs/pali3_5b/stage1.yaml \\
        --nodes 32 --gpus-per-node 8 --partition gpu --time 2-00:00:00 [--dry-run]

The script is rendered from ``cluster/templates/train.sbatch`` and written beside the run's logs
(``<run_dir>/slurm/``), so what ran can always be read. Everything that can be refused is refused
before ``sbatch``: the configs (layout against nodes x tasks, batch split), and, where Slurm
answers, the partition (exists, is up, has that many nodes). Several ``--config`` files make a job
array, one task per config (a transfer sweep). The job survives its time limit: Slurm signals
the script ``--signal-seconds`` before the end, the ranks save and exit 75, the script requeues
the job, and the requeued job resumes from ``latest`` in the same MLflow run, at most
``--max-requeues`` times.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pali3_train.config import Config, ConfigError, add_overrides_option, load_config
from pali3_train.engine.checks import check_layout, check_stage_flag
from pali3_train.stages.curriculum import CURRICULUM

TEMPLATE = Path(__file__).parent / "templates" / "train.sbatch"


class RequestError(ValueError):
    """The request cannot run on this cluster; the message names the option."""


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    up: bool
    default: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=tuple(CURRICULUM), help="checked against each config")
    parser.add_argument("--config", required=True, nargs="+", help="several: a job array")
    add_overrides_option(parser)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU-only nodes")
    parser.add_argument("--tasks-per-node", type=int, help="ranks per node (default: GPUs, or 1)")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--time", default="24:00:00", help="Slurm time limit")
    parser.add_argument("--signal-seconds", type=int, default=300, help="save this long before it")
    parser.add_argument("--max-requeues", type=int, default=20)
    parser.add_argument("--job-name")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="return when the job has ended")
    args = parser.parse_args(argv)
    for name in ("nodes", "cpus_per_task", "signal_seconds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpus_per_node < 0 or args.max_requeues < 0:
        parser.error("--gpus-per-node and --max-requeues must be >= 0")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node or 1
    return args


def load_configs(args: argparse.Namespace) -> list[Config]:
    """Every config, validated against the world the job will have."""
    world = args.nodes * args.tasks_per_node
    configs = []
    for path in args.config:
        cfg = check_stage_flag(load_config(path, args.set), args.stage, path)
        check_layout(cfg, world, path)
        configs.append(cfg)
    return configs


# -------------------------------------------------------------------------- the cluster's side


def partitions() -> list[Partition] | None:
    """What ``scontrol`` says of the partitions; None where there is no Slurm to ask."""
    if shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "show", "partition", "--oneliner"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    if out.returncode != 0:
        raise RequestError(f"scontrol show partition failed: {out.stderr.strip()}")
    found = []
    for line in out.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "PartitionName" in fields:
            name, nodes = fields["PartitionName"], int(fields.get("TotalNodes", 0))
            up, default = fields.get("State") == "UP", fields.get("Default") == "YES"
            found.append(Partition(name, nodes, up, default))
    return found


def check_request(args: argparse.Namespace, known: list[Partition] | None) -> None:
    if known is None:
        return
    if args.partition is None:
        default = next((p for p in known if p.default), None)
        if default is None:
            names = ", ".join(p.name for p in known)
            raise RequestError(f"--partition: this cluster has no default partition ({names})")
        partition = default
    else:
        partition = next((p for p in known if p.name == args.partition), None)
        if partition is None:
            names = ", ".join(p.name for p in known) or "none"
            raise RequestError(f"--partition: no partition {args.partition!r} (there are: {names})")
    if not partition.up:
        raise RequestError(f"--partition: {partition.name} is not up")
    if args.nodes > partition.nodes:
        raise RequestError(
            f"--nodes: {args.nodes} requested, partition {partition.name} has {partition.nodes}"
        )


# ----------------------------------------------------------------------------------- the script


def render(args: argparse.Namespace, configs: list[Config]) -> str:
    array = len(args.config) > 1
    optional = [f"#SBATCH --{name}={value}" for name, value in (
        ("partition", args.partition), ("account", args.account), ("qos", args.qos),
        ("gpus-per-node", args.gpus_per_node or None),
        ("array", f"0-{len(args.config) - 1}" if array else None),
    ) if value]  # fmt: skip
    environment = ["export PYTHONUNBUFFERED=1"]
    if args.gpus_per_node == 0:
        environment += ["export DS_ACCELERATOR=cpu",
                        f"export OMP_NUM_THREADS={args.cpus_per_task}"]  # fmt: skip
    values = {
        "stage": args.stage or configs[0].stage.name or configs[0].stage.objective,
        "stage_flag": f" --stage {args.stage}" if args.stage else "",
        "configs_comment": ", ".join(args.config),
        "world_size": str(args.nodes * args.tasks_per_node),
        "job_name": job_name(args),
        "nodes": str(args.nodes),
        "tasks_per_node": str(args.tasks_per_node),
        "cpus_per_task": str(args.cpus_per_task),
        "time": args.time,
        "log_dir": str(log_dir(configs[0])),
        "log_name": "%x-%A_%a.out" if array else "%x-%j.out",
        "signal_seconds": str(args.signal_seconds),
        "optional_directives": "\n".join(optional),
        "workdir": shlex.quote(str(Path.cwd())),
        "environment": "\n".join(environment),
        "configs": " ".join(shlex.quote(c) for c in args.config),
        "max_requeues": str(args.max_requeues),
        "python": shlex.quote(sys.executable),
        "overrides": overrides(args.set),
    }
    script = TEMPLATE.read_text()
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", value)
    assert "{{" not in script, "a template placeholder was left unfilled"
    return script


def overrides(items: list[str]) -> str:
    """One ``--set`` followed by every item (a repeated ``--set`` would keep only the last)."""
    if not items:
        return ""
    return " \\\n    --set " + " ".join(shlex.quote(item) for item in items)


def job_name(args: argparse.Namespace) -> str:
    stage = f"stage{args.stage}-" if args.stage else ""
    return args.job_name or f"pali3-{stage}{Path(args.config[0]).stem}"


def log_dir(cfg: Config) -> Path:
    return (Path(cfg.run_dir) / "slurm").resolve()


def submit(script: str, path: Path, wait: bool) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    command = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(path)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0 and not (wait and out.stdout.strip()):
        raise RequestError(f"sbatch refused the job: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_request(args, partitions())
    except RequestError as exc:
        if not args.dry_run:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"warning: request not checked against the cluster: {exc}", file=sys.stderr)
    try:
        configs = load_configs(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    script = render(args, configs)
    if args.dry_run:
        print(script, end="")
        return 0
    path = log_dir(configs[0]) / f"{job_name(args)}.sbatch"
    try:
        job = submit(script, path, args.wait)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job}: {path}")
    print(f"  follow: tail -f {log_dir(configs[0])}/{job_name(args)}-{job}*.out; squeue -j {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
