"""Submit a training stage to Slurm: config -> checked request -> sbatch script -> job.

    python -m pali3_train.cluster.submit --stage 1 --config configs/pali3_5b/stage1.yaml \\
        --nodes 32 --gpus-per-node 8 --partition gpu --time 2-00:00:00 [--dry-run]

The script is rendered from ``cluster/templates/train.sbatch`` and written beside the run's logs
(``<run_dir>/slurm/``), so what ran can always be read. Everything that can be refused is refused
before ``sbatch``: the configs (layout against nodes x tasks, batch split), and, where Slurm
answers, the partition (exists, is up, has that many nodes). Several ``--config`` files make a job
array, one task per config (a transfer sweep). The job survives its time limit: Slurm signals
the script ``--signal-seconds`` before the end, the ranks save and exit 75, the script requeues
the job, and the requeued job resumes from ``latest`` in the same MLflow run, at most
``--max-requeues`` times.

What the job needs around the ranks comes from the config's ``cluster:`` section or the same-named
options, which win: ``--setup`` lines (``module load``, a venv's activation) run before the ranks,
``--env NAME=VALUE`` is exported for them, ``--container-image``/``--container-mounts`` run them in
a pyxis container, ``--exclusive``, ``--constraint``, ``--mem`` and ``--sbatch`` lines reach sbatch.
The ranks run ``python`` from the job's PATH after the setup lines (``--python`` pins one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pali3_train.cli import command_parser
from pali3_train.config import Config, ConfigError, add_overrides_option, load_config
from pali3_train.config.schema import ClusterConfig, FieldError
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


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m pali3_train.cluster.submit", __doc__)
    parser.add_argument("--stage", choices=tuple(CURRICULUM), help="checked against each config")
    parser.add_argument("--config", required=True, nargs="+", help="several: a job array")
    add_overrides_option(parser)
    parser.add_argument("--nodes", type=int, required=True, help="nodes the job takes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU-only nodes")
    parser.add_argument("--tasks-per-node", type=int, help="ranks per node (default: GPUs, or 1)")
    parser.add_argument(
        "--cpus-per-task",
        type=int,
        help="default: data.num_workers + 1 (the rank and its loader workers)",
    )
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    parser.add_argument("--account", help="Slurm account to charge")
    parser.add_argument("--qos", help="Slurm quality of service")
    parser.add_argument("--time", default="24:00:00", help="Slurm time limit")
    parser.add_argument("--signal-seconds", type=int, default=300, help="save this long before it")
    parser.add_argument("--max-requeues", type=int, default=20,
                        help="times the job requeues itself at its time limit")  # fmt: skip
    parser.add_argument("--job-name", help="default: pali3-stage<S>-<config name>")
    job = parser.add_argument_group(
        "the job around the ranks (each wins over the config's cluster: field of the same name)"
    )
    job.add_argument(
        "--setup",
        action="append",
        metavar="LINE",
        help="a shell line run before the ranks start, e.g. 'module load cuda/12.4',"
        " 'source .venv/bin/activate' (repeat; replaces cluster.setup)",
    )
    job.add_argument(
        "--python",
        help="the interpreter the ranks run (default: python, from the "
        "job's PATH after the setup lines)",
    )
    job.add_argument("--container-image", help="pyxis: run the ranks in this image")
    job.add_argument(
        "--container-mounts",
        metavar="SRC:DST[,SRC:DST]",
        help="pyxis bind mounts (the working directory must be among them)",
    )
    job.add_argument("--exclusive", action=argparse.BooleanOptionalAction, help="whole nodes")
    job.add_argument("--constraint", help="node features, e.g. 'a100&ib'")
    job.add_argument("--mem", help="memory per node: 0 (all of it), 200G")
    job.add_argument(
        "--sbatch",
        action="append",
        metavar="--OPTION",
        help="one more #SBATCH line, written --sbatch=--reservation=foo (repeat; "
        "replaces cluster.sbatch_extra)",
    )
    job.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="exported for the ranks, e.g. NCCL_DEBUG=WARN (repeat; replaces the "
        "cluster.env item of that name)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="return when the job has ended")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("nodes", "signal_seconds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpus_per_node < 0 or args.max_requeues < 0:
        parser.error("--gpus-per-node and --max-requeues must be >= 0")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node or 1
    return args


# The option that gives each cluster: field on the command line.
OPTIONS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(ClusterConfig)}
OPTIONS["sbatch_extra"] = "--sbatch"


def load_configs(args: argparse.Namespace) -> list[Config]:
    """Every config, validated against the world the job will have."""
    world = args.nodes * args.tasks_per_node
    configs = []
    for path in args.config:
        cfg = check_stage_flag(load_config(path, args.set), args.stage, path)
        check_layout(cfg, world, path)
        configs.append(cfg)
    return configs


def job_settings(args: argparse.Namespace, configs: list[Config]) -> ClusterConfig:
    """The config's ``cluster:`` section with the command line's options over it, checked; the
    one section every config of an array shares."""
    base = configs[0].cluster
    for path, cfg in zip(args.config[1:], configs[1:]):
        if cfg.cluster != base:
            raise RequestError(f"--config {path}: its cluster: section differs from "
                               f"{args.config[0]}'s (one job script runs every task)")  # fmt: skip
    scalars = ("python", "container_image", "container_mounts", "exclusive", "constraint", "mem",
               "cpus_per_task")  # fmt: skip
    changes = {name: getattr(args, name) for name in scalars if getattr(args, name) is not None}
    if args.setup is not None:
        changes["setup"] = tuple(args.setup)
    if args.sbatch is not None:
        changes["sbatch_extra"] = tuple(args.sbatch)
    if args.env is not None:  # by name: the command line's item replaces the config's
        merged = {item.partition("=")[0]: item for item in base.env}
        merged.update({item.partition("=")[0]: item for item in args.env})
        changes["env"] = tuple(merged.values())
    try:
        settings = dataclasses.replace(base, **changes)
    except FieldError as exc:
        field = exc.field_path.split("[")[0]
        raise RequestError(f"{OPTIONS.get(field, field)}: {exc.message}") from None
    return settings


def cpus_per_task(configs: list[Config], settings: ClusterConfig) -> int:
    """--cpus-per-task or cluster.cpus_per_task, else the rank plus its loader workers."""
    if settings.cpus_per_task is not None:  # --cpus-per-task is already in it
        return settings.cpus_per_task
    return max(cfg.data.num_workers for cfg in configs) + 1


def python_note(settings: ClusterConfig) -> str | None:
    """A hint where the ranks' ``python`` (looked up on the job's PATH) is not, here, this
    interpreter and nothing says which to use: likely not the one with the project installed."""
    if settings.setup or settings.container_image or settings.python != "python":
        return None
    found = shutil.which("python")
    if (
        found
        and Path(os.path.abspath(found)).parent == Path(os.path.abspath(sys.executable)).parent
    ):
        return None
    return (f"note: the ranks run `python` from the job's PATH, here {found or 'none'}, not "
            f"{sys.executable}; give --setup 'source .venv/bin/activate' (or cluster.setup) or "
            "--python")  # fmt: skip


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


def render(args: argparse.Namespace, configs: list[Config], settings: ClusterConfig) -> str:
    array = len(args.config) > 1
    cpus = cpus_per_task(configs, settings)
    optional = [f"#SBATCH --{name}={value}" for name, value in (
        ("partition", args.partition), ("account", args.account), ("qos", args.qos),
        ("gpus-per-node", args.gpus_per_node or None),
        ("array", f"0-{len(args.config) - 1}" if array else None),
        ("constraint", settings.constraint), ("mem", settings.mem),
    ) if value is not None and value != ""]  # fmt: skip
    optional += ["#SBATCH --exclusive"] if settings.exclusive else []
    optional += [f"#SBATCH {line}" for line in settings.sbatch_extra]
    environment = ["export PYTHONUNBUFFERED=1"]
    if args.gpus_per_node == 0:
        environment += ["export DS_ACCELERATOR=cpu", f"export OMP_NUM_THREADS={cpus}"]
    values = {
        "stage": args.stage or configs[0].stage.name or configs[0].stage.objective,
        "stage_flag": f" --stage {args.stage}" if args.stage else "",
        "configs_comment": ", ".join(args.config),
        "world_size": str(args.nodes * args.tasks_per_node),
        "job_name": job_name(args),
        "nodes": str(args.nodes),
        "tasks_per_node": str(args.tasks_per_node),
        "cpus_per_task": str(cpus),
        "time": args.time,
        "log_dir": str(log_dir(configs[0])),
        "log_name": "%x-%A_%a.out" if array else "%x-%j.out",
        "signal_seconds": str(args.signal_seconds),
        "optional_directives": "\n".join(optional),
        "workdir": shlex.quote(str(Path.cwd())),
        "environment": "\n".join(environment),
        "setup": setup_block(settings.setup),
        "env": env_block(settings.env),
        "python_check": "" if settings.container_image else PYTHON_CHECK,
        "configs": " ".join(shlex.quote(c) for c in args.config),
        "max_requeues": str(args.max_requeues),
        "python": shlex.quote(settings.python),
        "srun_options": container_options(settings),
        "overrides": overrides(args.set),
    }
    script = TEMPLATE.read_text()
    for key, value in values.items():
        # A placeholder alone on its line is a block: nothing to fill leaves no empty line.
        script = script.replace("{{" + key + "}}\n", value + "\n" if value else "")
        script = script.replace("{{" + key + "}}", value)
    assert "{{" not in script, "a template placeholder was left unfilled"
    return script


PYTHON_CHECK = "\n".join([
    'if ! command -v "$PYTHON" >/dev/null; then',
    '    echo "[$(date -Is)] no $PYTHON on PATH: activate a venv in --setup, or give --python"',
    "    exit 2",
    "fi",
    'echo "[$(date -Is)] python: $(command -v "$PYTHON")"',
])  # fmt: skip


def setup_block(lines: tuple[str, ...]) -> str:
    """The setup lines, each run in the script's shell (a venv it activates is the ranks' too),
    logged first; the first that fails ends the job with its exit code."""
    if not lines:
        return ""
    quoted = "\n".join(f"    {shlex.quote(line)}" for line in lines)
    return f"""\
# Setup lines (cluster.setup, --setup), run here before the ranks start.
SETUP=(
{quoted}
)
set +u  # activation scripts and `module` may read unset variables
for LINE in "${{SETUP[@]}}"; do
    echo "[$(date -Is)] setup: $LINE"
    eval "$LINE" || {{
        CODE=$?; echo "[$(date -Is)] setup failed (exit $CODE): $LINE"; exit "$CODE"
    }}
done
set -u"""


def env_block(items: tuple[str, ...]) -> str:
    """``export NAME=value`` for every item (cluster.env, --env), values shell-quoted."""
    if not items:
        return ""
    exports = [f"export {name}={shlex.quote(value)}"
               for name, _, value in (item.partition("=") for item in items)]  # fmt: skip
    return "\n".join(["# For the ranks (cluster.env, --env).", *exports])


def container_options(settings: ClusterConfig) -> str:
    """srun's pyxis options: the image, its mounts, and this folder as its working directory."""
    if settings.container_image is None:
        return ""
    options = [f"--container-image={shlex.quote(settings.container_image)}"]
    if settings.container_mounts is not None:
        options.append(f"--container-mounts={shlex.quote(settings.container_mounts)}")
    options.append(f"--container-workdir={shlex.quote(str(Path.cwd()))}")
    return " " + " ".join(options) + " \\\n   "


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
        settings = job_settings(args, configs)
    except (ConfigError, RequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    script = render(args, configs, settings)
    if note := python_note(settings):
        print(note, file=sys.stderr)
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
