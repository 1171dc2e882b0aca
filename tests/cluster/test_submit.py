"""`python -m pali3_train.cluster.submit` against a real Slurm cluster (two slurmd daemons on this
machine): a 2-node job trains the tiny preset with one rank per node; a job sent the time-limit
signal saves, requeues itself and ends with the losses of an uninterrupted job, in the same MLflow
run; requests the cluster cannot run are refused before sbatch; a job array's setup lines and
environment reach every rank. Rendering is checked without Slurm (also test_job_options.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pali3_train.plots import read_metrics
from tests.engine.conftest import ROOT, stage_config

SUBMIT = "pali3_train.cluster.submit"  # run as python -m SUBMIT
STEPS = 300  # long enough (~15 s on 2 CPU ranks) to signal the job mid-way
OVERRIDES = ("--set", "train.seed=3", "train.warmup_steps=2")  # both must reach the ranks


def _submit(*args: str, env: dict, config: Path | None = None, stage: str = "1"):
    configs = ["--config", str(config)] if config else []
    command = [sys.executable, "-m", SUBMIT, "--stage", stage, *configs,
               "--gpus-per-node", "0", "--tasks-per-node", "1", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)  # fmt: skip


def _job_config(demo, run_dir: Path) -> Path:
    train = {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2}
    # The ranks run this interpreter, pinned by the config (cluster.python; --python would win).
    return stage_config(demo, run_dir, train=train, checkpoint={"every_steps": 1000},
                        tracking={"backend": "mlflow", "store_dir": str(run_dir)},
                        cluster={"python": sys.executable})  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(run_dir / "metrics.jsonl").items()}


def _log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, demo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _submit("--nodes", "2", "--wait", *OVERRIDES, env=slurm_cluster.env(),
                     config=_job_config(demo, run_dir))  # fmt: skip
    assert result.returncode == 0, (result.stdout, result.stderr, _log(run_dir))
    return run_dir


@pytest.mark.slurm
def test_a_two_node_job_trains_with_one_rank_per_node(uninterrupted):
    assert sorted(_losses(uninterrupted)) == list(range(1, STEPS + 1))
    log = _log(uninterrupted)
    assert "on n[1-2]" in log and "finished" in log, log
    assert (uninterrupted / "model.safetensors").is_file()
    train = yaml.safe_load((uninterrupted / "config.yaml").read_text())["train"]
    assert (train["seed"], train["warmup_steps"]) == (3, 2)


@pytest.mark.slurm
def test_the_time_limit_signal_saves_requeues_and_ends_like_an_uninterrupted_job(
    slurm_cluster, demo, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    env = slurm_cluster.env()
    result = _submit("--nodes", "2", *OVERRIDES, env=env, config=_job_config(demo, run_dir))
    assert result.returncode == 0, result.stderr
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    _wait_for(lambda: len(_losses(run_dir)) >= 20, 300, f"job {job} to train 20 steps", run_dir)
    # What `#SBATCH --signal=B:USR1@N` does before the time limit (and preemption with TERM).
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _wait_for(lambda: _job_state(job, env) in ("COMPLETED", None), 600, f"job {job} to end",
              run_dir)  # fmt: skip
    log = _log(run_dir)
    assert "got USR1" in log and "requeueing (1 of 20)" in log and "finished" in log, log
    assert log.count("run 1:") == 1 and log.count("run 2:") == 1, log
    expected, got = _losses(uninterrupted), _losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "the requeued job continued the same MLflow run"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == set(range(1, STEPS + 1))


# On the --env PYTHONPATH of the array job below: every Python process a rank starts records
# what it saw (the interpreter, the variables the setup lines and --env gave it).
SITECUSTOMIZE = """\
import json, os, sys
if "SLURM_PROCID" in os.environ:
    seen = {k: os.environ.get(k) for k in ("SETUP_SAW_TASK", "FROM_CONFIG", "NOTE")}
    name = f"task{os.environ.get('SLURM_ARRAY_TASK_ID')}-rank{os.environ['SLURM_PROCID']}.json"
    with open(os.path.join(os.path.dirname(__file__), name), "w") as f:
        json.dump({**seen, "prefix": sys.prefix}, f)
"""


def test_a_job_array_trains_one_config_per_task(slurm_cluster, demo, tmp_path):
    """One task per config; and the job around the ranks: the configs' setup lines (cluster.setup)
    run in order in the script's shell before the ranks start (what they export, the ranks
    see); the configs' cluster.env and --env items (a value with a quote, a space and a $) reach
    every rank as given. The interpreter is pinned (cluster.python) as in the other jobs: a job
    that activated the venv instead rebuilt DeepSpeed's cached CPU op (~60 s), built by another
    command in an activated environment than in the bare one the other runs use."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cluster = {"setup": ["export SETUP_SAW_TASK=task$SLURM_ARRAY_TASK_ID",
                         'SETUP_SAW_TASK="$SETUP_SAW_TASK, then line 2"'],
               "env": ["FROM_CONFIG=config", "NOTE=replaced by --env"],
               "python": sys.executable}  # fmt: skip
    short = {"steps": 2, "global_batch_size": 2, "micro_batch_size": 2}
    first, second = (stage_config(demo, tmp_path / name, train=short, cluster=cluster)
                     for name in ("a", "b"))  # fmt: skip
    note = "it's a $HOME"
    command = [sys.executable, "-m", SUBMIT, "--stage", "transfer", "--nodes", "1",
               "--gpus-per-node", "0", "--wait", "--config", str(first), str(second),
               "--env", f"PYTHONPATH={marks}", "--env", f"NOTE={note}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=slurm_cluster.env(),
                            cwd=ROOT, timeout=600)  # fmt: skip
    assert result.returncode == 0, (result.stdout, result.stderr, _log(tmp_path / "a"))
    for name in ("a", "b"):
        assert sorted(_losses(tmp_path / name)) == [1, 2], name
    logs = sorted(p.name for p in (tmp_path / "a" / "slurm").glob("*.out"))
    assert len(logs) == 2 and logs[0].endswith("_0.out") and logs[1].endswith("_1.out"), logs
    log = _log(tmp_path / "a")
    assert log.count("setup: export SETUP_SAW_TASK=task$SLURM_ARRAY_TASK_ID") == 2, log
    assert log.count(f"python: {sys.executable}") == 2, log
    for task in (0, 1):
        seen = json.loads((marks / f"task{task}-rank0.json").read_text())
        assert seen == {"SETUP_SAW_TASK": f"task{task}, then line 2", "FROM_CONFIG": "config",
                        "NOTE": note, "prefix": sys.prefix}, seen  # fmt: skip


@pytest.mark.slurm
@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "3"], "--nodes: 3 requested, partition debug has 2"),
        (
            ["--nodes", "1", "--partition", "gpu"],
            "--partition: no partition 'gpu' (there are: debug)",
        ),
    ],
)
def test_a_request_the_cluster_cannot_run_is_refused_before_sbatch(
    slurm_cluster, demo, tmp_path, args, message
):
    run_dir = tmp_path / "run"
    result = _submit(*args, env=slurm_cluster.env(), config=_job_config(demo, run_dir))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (run_dir / "slurm").exists()


# ------------------------------------------------------------------------ rendering, no Slurm


def test_a_dry_run_renders_the_script_with_the_signal_requeue_and_every_option(demo, tmp_path):
    config = _job_config(demo, tmp_path / "run")
    result = _submit("--nodes", "2", "--partition", "p", "--account", "a", "--qos", "q",
                     "--time", "1:00:00", "--signal-seconds", "120", "--dry-run",
                     "--set", "train.lr=1e-4", "run_dir=x y", env=_no_slurm_env(),
                     config=config)  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=1:00:00",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --partition=p",
                 "#SBATCH --account=a", "#SBATCH --qos=q", "--set train.lr=1e-4 'run_dir=x y'",
                 "export DS_ACCELERATOR=cpu"):  # fmt: skip
        assert line in script, line
    assert "{{" not in script and "--gpus-per-node" not in script
    bash = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


def test_several_configs_make_a_job_array(demo, tmp_path):
    train = {"global_batch_size": 16, "micro_batch_size": 2}  # 8 ranks
    first, second = (stage_config(demo, tmp_path / name, train=train) for name in ("a", "b"))
    result = subprocess.run(
        [sys.executable, "-m", SUBMIT, "--stage", "transfer", "--config", str(first),
         str(second), "--nodes", "1", "--gpus-per-node", "8", "--dry-run"],
        capture_output=True, text=True, env=_no_slurm_env(), cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-1" in result.stdout and "#SBATCH --gpus-per-node=8" in result.stdout
    assert f"CONFIGS=({first} {second})" in result.stdout and "%x-%A_%a.out" in result.stdout


def test_a_layout_the_job_cannot_have_is_refused_naming_the_field(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run", parallel={"tensor_parallel_size": 2})
    result = _submit("--nodes", "3", "--dry-run", env=_no_slurm_env(), config=config)
    assert result.returncode == 2
    assert "parallel.tensor_parallel_size: 2 does not divide the world size 3" in result.stderr


def test_the_stage_comes_from_the_config_and_a_disagreeing_stage_is_refused(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run")  # generative, no stage name
    command = [sys.executable, "-m", SUBMIT, "--config", str(config), "--nodes", "1",
               "--gpus-per-node", "2", "--dry-run"]  # fmt: skip
    rendered = subprocess.run(command, capture_output=True, text=True, env=_no_slurm_env(),
                              cwd=ROOT, timeout=120)  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert "launcher/run.py --config" in rendered.stdout
    assert "# pali3-train, stage generative:" in rendered.stdout
    refused = subprocess.run([*command, "--stage", "0"], capture_output=True, text=True,
                             env=_no_slurm_env(), cwd=ROOT, timeout=120)  # fmt: skip
    assert refused.returncode == 2
    assert "stage.objective: is 'generative', but --stage 0 trains the contrastive" in (
        refused.stderr
    )


# ------------------------------------------------------------------------------------ helpers


def _no_slurm_env() -> dict:
    """Rendering needs no cluster: without SLURM_CONF the request is only warned about."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}


def _job_state(job: str, env: dict) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", job, "--oneliner"], capture_output=True,
                         text=True, env=env)  # fmt: skip
    found = re.search(r"JobState=(\w+)", out.stdout)
    return found.group(1) if found else None


def _wait_for(condition, seconds: float, what: str, run_dir: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{_log(run_dir)[-3000:]}")
        time.sleep(0.5)
