"""Run a whole curriculum: untrained baselines, then each stage in order, each a real multi-process
launch of ``launcher/run.py``; then one table of every stage's held-out metrics.

    python launcher/curriculum.py configs/tiny/curriculum.yaml        (what `make demo` runs)

Every stage config is validated before the first process starts. A stage that fails stops the
curriculum; running it again resumes each stage from its last checkpoint (a finished stage only
re-evaluates and re-exports). With a shared MLflow store the stage runs nest under one parent run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pali3_train.cli import command_parser
from pali3_train.config import Config, ConfigError, add_overrides_option, load_config
from pali3_train.config.curriculum import Curriculum, CurriculumStep
from pali3_train.config.loader import load_with_sources
from pali3_train.engine.checks import check_freeze, check_layout, check_stage_flag
from pali3_train.plots import plot_loss_curves
from pali3_train.tracking import ParentRun, ui_command

ROOT = Path(__file__).resolve().parents[1]


def stage_config_path(curriculum_file: Path, step: CurriculumStep) -> Path:
    return (curriculum_file.parent / step.config).resolve()


def overrides(
    plan: Curriculum,
    step: CurriculumStep,
    parent: ParentRun | None,
    baseline: bool,
    common: list[str],
) -> list[str]:
    """--set items: the step's own, then the command line's (``common``, for every step), then
    where a baseline goes, then the MLflow nesting."""
    items = [*step.set, *common]
    if baseline:
        items += [f"run_dir={plan.run_dir}/{step.name}", "stage.init_from=null"]
    items.append(f"tracking.run_name={step.name}")
    if parent is not None:
        items.append(f"tracking.parent_run_id={parent.run_id}")
    return items


def steps(plan: Curriculum) -> list[tuple[CurriculumStep, bool]]:
    """(step, is a baseline) in the order they run."""
    return [(step, True) for step in plan.baselines] + [(step, False) for step in plan.stages]


def check_all(path: Path, plan: Curriculum, common: list[str]) -> dict[str, Config]:
    """Every step's config, loaded and validated with ``common`` overrides: a typo in the last
    stage fails now, not an hour into the first."""
    configs = {}
    for step, baseline in steps(plan):
        config_path = stage_config_path(path, step)
        if not config_path.is_file():
            raise ConfigError(str(path), f"{step.name}.config", f"{config_path} does not exist")
        # where: the stage file, knowing which fields the step's --set items gave
        cfg, where = load_with_sources(config_path, overrides(plan, step, None, baseline, common))
        cfg = check_stage_flag(cfg, step.stage, where)
        check_layout(cfg, plan.nproc_per_node, where, training=not baseline)
        check_freeze(cfg, where, training=not baseline)  # module names, on the meta device
        configs[step.name] = cfg
    return configs


def launch_command(plan: Curriculum, step: CurriculumStep, config: Path, extra: list[str]):
    stage = ["--stage", step.stage] if step.stage else []
    entry = [str(ROOT / "launcher" / "run.py"), *stage, "--config", str(config)]
    if plan.launcher == "deepspeed":
        runner = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(plan.nproc_per_node)]
    else:
        runner = ["-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={plan.nproc_per_node}"]  # fmt: skip
    return [sys.executable, *runner, *entry, *extra]


def launch_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")  # n processes share the cores
    return env


def run_step(
    args: argparse.Namespace, plan: Curriculum, step: CurriculumStep, cfg: Config, parent,
    baseline: bool,
) -> float:  # fmt: skip
    path = args.curriculum
    extra = ["--set", *overrides(plan, step, parent, baseline, args.set)]
    extra += ["--eval-only"] if baseline else []
    extra += ["--verbose"] if args.verbose else []
    trains = f"stage {cfg.stage.name}" if cfg.stage.name else f"{cfg.stage.objective} objective"
    what = "untrained baseline, evaluated" if baseline else trains
    print(f"\n=== {step.name} ({what}): {step.config}", flush=True)
    start = time.perf_counter()
    command = launch_command(plan, step, stage_config_path(path, step), extra)
    result = subprocess.run(command, env=launch_env(), cwd=os.getcwd())
    if result.returncode != 0:
        raise SystemExit(f"{step.name} failed with exit code {result.returncode}; fix it and "
                         f"run the same command again to resume: {' '.join(sys.argv)}")  # fmt: skip
    return time.perf_counter() - start


def final_eval(run_dir: Path) -> dict[str, float]:
    """The last evaluation a run logged (eval.jsonl), without the ``eval/`` prefix."""
    path = run_dir / "eval.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return {}
    row = json.loads(lines[-1])
    return {k.removeprefix("eval/"): v for k, v in row.items() if k != "step"}


def results_table(columns: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per eval metric, one column per step, "-" where a step has none."""
    metrics = list(dict.fromkeys(m for values in columns.values() for m in values))
    lines = [
        "| metric | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for metric in metrics:
        cells = [f"{v[metric]:.3f}" if metric in v else "-" for v in columns.values()]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python launcher/curriculum.py", __doc__)
    parser.add_argument("curriculum", type=Path, help="a curriculum YAML (see configs/tiny/)")
    add_overrides_option(parser, "for every step, after its own set: items")
    parser.add_argument("--verbose", action="store_true", help="passed to every stage's run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = load_config(args.curriculum, schema=Curriculum)
        configs = check_all(args.curriculum, plan, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(plan.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    first = configs[plan.stages[0].name].tracking
    parent = ParentRun.open(first, args.curriculum.stem)
    seconds, status = {}, "FAILED"
    try:
        for step, baseline in steps(plan):
            cfg = configs[step.name]
            seconds[step.name] = run_step(args, plan, step, cfg, parent, baseline)
        status = "FINISHED"
    finally:
        columns = {name: final_eval(Path(cfg.run_dir)) for name, cfg in configs.items()}
        table = results_table(columns)
        report = root / "results.md"
        report.write_text(table + "\n")
        trained = {s.name: Path(configs[s.name].run_dir) / "metrics.jsonl" for s in plan.stages}
        plot_loss_curves(trained, root / "loss_curves.png")
        if parent is not None:
            flat = {f"{s}/{m}": v for s, values in columns.items() for m, v in values.items()}
            parent.finish(flat, [report, root / "loss_curves.png"], status)
    print(f"\n{table}\n")
    print(summary(plan, configs, seconds, first))
    return 0


def summary(plan: Curriculum, configs: dict[str, Config], seconds: dict, tracking) -> str:
    lines = [f"results: {plan.run_dir}/results.md, loss curves: {plan.run_dir}/loss_curves.png"]
    lines += [f"  {name:<22} {took:6.0f} s   {configs[name].run_dir}"
              for name, took in seconds.items()]  # fmt: skip
    if tracking.backend != "none":
        lines.append(f"MLflow UI: {ui_command(tracking)}  (then open http://127.0.0.1:5000)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
