"""The job around the ranks, rendered by ``python -m pali3_train.cluster.submit --dry-run`` in this
process (no Slurm asked): every option of the ``cluster:`` section and its command-line twin, the
options winning, the interpreter looked up on the node, the CPUs per rank, and each refusal as one
line. The real job that runs setup lines and --env items is in test_submit.py (the job array)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pali3_train.cluster import submit
from tests.engine.conftest import ROOT, stage_config


@pytest.fixture
def render(monkeypatch, capsys, demo, tmp_path):
    """``render(*args, cluster=..., data=...)`` or ``render(*args, config=path or [paths])``:
    (exit code, script, stderr) of a dry run."""
    monkeypatch.setattr(submit, "partitions", lambda: None)
    monkeypatch.chdir(ROOT)

    def run(*args: str, cluster: dict | None = None, data: dict | None = None, config=None):
        sections = {"cluster": cluster} if cluster is not None else {}
        configs = config or [stage_config(demo, tmp_path / "run", data=data or {}, **sections)]
        configs = configs if isinstance(configs, list) else [configs]
        code = submit.main(["--config", *map(str, configs), "--nodes", "2", "--gpus-per-node",
                            "0", "--tasks-per-node", "1", "--dry-run", *args])  # fmt: skip
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _directives(script: str) -> list[str]:
    """The lines from the first #SBATCH to the first command: only #SBATCH lines and comments."""
    lines = script.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    last = lines.index("set -uo pipefail")
    return lines[first:last]


def _prelude(script: str) -> str:
    """The script up to the rendezvous: cd, exports, setup lines, environment, python check."""
    return script[: script.index("# One config per array task")]


def test_every_job_option_renders_into_the_script(render):
    code, script, err = render(
        "--setup", "module load cuda/12.4", "--setup", "source .venv/bin/activate",
        "--env", "NCCL_DEBUG=WARN", "--env", "NCCL_IB_HCA=mlx5_0:1,mlx5_1:1",
        "--env", "QUOTED=it's $HOME", "--exclusive", "--constraint", "a100&ib", "--mem", "0",
        "--sbatch=--reservation=foo", "--sbatch=--mail-type=END",
        "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3",
        "--container-mounts", "/shared:/shared,/data:/data:ro",
    )  # fmt: skip
    assert code == 0, err
    directives = _directives(script)
    for line in ("#SBATCH --exclusive", "#SBATCH --constraint=a100&ib", "#SBATCH --mem=0",
                 "#SBATCH --reservation=foo", "#SBATCH --mail-type=END"):  # fmt: skip
        assert line in directives, (line, directives)
    assert all(line.startswith("#") for line in directives), directives  # no empty lines
    for line in ("    'module load cuda/12.4'", "    'source .venv/bin/activate'",
                 'eval "$LINE" ||', "export NCCL_DEBUG=WARN",
                 "export NCCL_IB_HCA=mlx5_0:1,mlx5_1:1", "export QUOTED='it'\"'\"'s $HOME'",
                 "srun --container-image='nvcr.io#nvidia/pytorch:25.01-py3' "
                 "--container-mounts=/shared:/shared,/data:/data:ro "
                 f"--container-workdir={ROOT} \\\n    \"$PYTHON\" launcher/run.py"):  # fmt: skip
        assert line in script, line
    # setup lines, then the environment, then what runs the ranks
    order = [script.index(s) for s in ("SETUP=(", "export NCCL_DEBUG", "PYTHON=python", "srun ")]
    assert order == sorted(order), order
    assert "command -v" not in script  # the interpreter is the container's: not checked here
    assert "{{" not in script
    bash = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


def test_no_option_leaves_no_line_behind(render):
    code, script, err = render()
    assert code == 0, err
    assert all(line.startswith("#SBATCH") or line.startswith("# ")
               for line in _directives(script))  # fmt: skip
    for absent in ("--exclusive", "--constraint", "--mem", "SETUP=", "cluster.env", "container"):
        assert absent not in script, absent
    assert "\n\n\n" not in script


def test_the_script_runs_python_from_the_jobs_path_not_the_submitting_interpreter(
    render, monkeypatch
):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # this interpreter's folder not on it
    code, script, err = render()
    assert code == 0, err
    assert sys.executable not in script and sys.prefix not in script
    assert not re.search(r"/\S*/python[\d.]*\b", script), "an absolute interpreter path"
    assert "PYTHON=python\n" in script and 'srun "$PYTHON" launcher/run.py' in script
    assert 'command -v "$PYTHON"' in script  # on the node, after the setup lines
    assert "note: the ranks run `python` from the job's PATH" in err  # and how to choose one
    code, script, err = render("--python", "/opt/conda/envs/pali3/bin/python")
    assert "PYTHON=/opt/conda/envs/pali3/bin/python\n" in script and "note:" not in err
    code, script, err = render("--setup", "source .venv/bin/activate")
    assert "PYTHON=python\n" in script and "note:" not in err


def test_the_setup_lines_run_in_order_and_the_first_that_fails_ends_the_job(render):
    code, script, err = render(
        "--python", sys.executable, "--setup", "export STEP=one", "--setup", 'STEP="$STEP two"',
        "--setup", "(exit 7)  # a comment", "--setup", "echo never", "--env", "AFTER=$STEP",
    )  # fmt: skip
    assert code == 0, err
    ran = subprocess.run(["bash"], input=_prelude(script), capture_output=True, text=True)
    assert ran.returncode == 7, (ran.stdout, ran.stderr)
    assert "setup failed (exit 7): (exit 7)  # a comment" in ran.stdout and "never" not in (
        ran.stdout
    ), ran.stdout
    code, script, err = render("--python", sys.executable, "--setup", "export STEP=one",
                               "--env", "AFTER=$STEP and more")  # fmt: skip
    shown = _prelude(script) + 'echo "STEP=$STEP AFTER=$AFTER"\n'
    ran = subprocess.run(["bash"], input=shown, capture_output=True, text=True)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    assert "STEP=one AFTER=$STEP and more" in ran.stdout  # --env values are taken as given
    assert f"python: {sys.executable}" in ran.stdout


def test_the_cluster_section_gives_the_defaults_and_the_options_win(render):
    cluster = {"setup": ["module load cuda/12.4"], "env": ["NCCL_DEBUG=INFO", "KEEP=1"],
               "mem": "100G", "exclusive": True, "constraint": "a100",
               "sbatch_extra": ["--reservation=r1"], "container_image": "img",
               "container_mounts": "/d:/d", "python": "python3"}  # fmt: skip
    code, script, err = render(cluster=cluster)
    assert code == 0, err
    for line in ("#SBATCH --mem=100G", "#SBATCH --exclusive", "#SBATCH --constraint=a100",
                 "#SBATCH --reservation=r1", "    'module load cuda/12.4'",
                 "export NCCL_DEBUG=INFO", "export KEEP=1", "--container-image=img",
                 "--container-mounts=/d:/d", "PYTHON=python3"):  # fmt: skip
        assert line in script, line
    code, script, err = render(
        "--setup", "source .venv/bin/activate", "--env", "NCCL_DEBUG=WARN", "--mem", "0",
        "--no-exclusive", "--constraint", "h100", "--sbatch=--reservation=r2",
        "--container-image", "img2", "--container-mounts", "/e:/e", "--python", "python3.11",
        cluster=cluster,
    )  # fmt: skip
    assert code == 0, err
    for line in ("#SBATCH --mem=0", "#SBATCH --constraint=h100", "#SBATCH --reservation=r2",
                 "    'source .venv/bin/activate'", "export NCCL_DEBUG=WARN", "export KEEP=1",
                 "--container-image=img2", "--container-mounts=/e:/e",
                 "PYTHON=python3.11"):  # fmt: skip
        assert line in script, line
    for gone in ("--exclusive", "module load", "NCCL_DEBUG=INFO", "r1", "=img ", "100G"):
        assert gone not in script, gone


def test_cpus_per_task_is_the_rank_and_its_loader_workers_unless_given(render):
    code, script, _ = render(data={"num_workers": 3})
    assert "#SBATCH --cpus-per-task=4" in script and "export OMP_NUM_THREADS=4" in script
    code, script, _ = render(data={"num_workers": 3}, cluster={"cpus_per_task": 6})
    assert "#SBATCH --cpus-per-task=6" in script
    code, script, _ = render("--cpus-per-task", "2", data={"num_workers": 3},
                             cluster={"cpus_per_task": 6})  # fmt: skip
    assert "#SBATCH --cpus-per-task=2" in script
    code, script, _ = render()  # the test configs read in the rank (num_workers: 0)
    assert "#SBATCH --cpus-per-task=1" in script


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "1BAD=x"], "--env: '1BAD' is not a shell variable name"),
        (["--env", "NCCL_DEBUG"], "--env: must be NAME=VALUE, got 'NCCL_DEBUG'"),
        (["--env", "MASTER_PORT=1"], "--env: MASTER_PORT is set by the job script"),
        (["--sbatch=reservation=foo"], "--sbatch: must be an sbatch option starting with --"),
        (["--sbatch=--time=1:00:00"], "--sbatch: --time is set by cluster.submit itself: use"),
        (["--mem", "lots"], "--mem: must be a size like 0 (a node's whole memory), 64000 (MB)"),
        (["--container-mounts", "/d:/d"], "--container-mounts: needs container_image"),
        (["--container-image", "a b"], "--container-image: must be non-empty, without spaces"),
        (["--setup", " "], "--setup: must be one non-empty line, got ' '"),
        (["--setup", "module load \\"], "--setup: must be a whole command, got a continued line"),
        (["--cpus-per-task", "0"], "--cpus-per-task: must be >= 1, got 0"),
        (["--python", ""], "--python: must be a command or a path, got ''"),
    ],
)  # fmt: skip
def test_a_bad_option_is_refused_in_one_line_naming_it(render, args, message):
    code, script, err = render(*args)
    assert code == 2 and not script
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err


@pytest.mark.parametrize(
    "cluster, message",
    [
        ({"env": ["1BAD=x"]}, "cluster.env[0]: '1BAD' is not a shell variable name"),
        ({"env": ["A=1", "A=2"]}, "cluster.env[1]: A is given twice"),
        ({"mem": 0}, "cluster.mem: must be a string, got int 0"),
        ({"sbatch_extra": ["--nodes=2"]}, "cluster.sbatch_extra[0]: --nodes is set by"),
        ({"container_mounts": "/d:/d"}, "cluster.container_mounts: needs container_image"),
        ({"exclusive": "yes"}, "cluster.exclusive: must be true or false, got 'yes'"),
        ({"setupp": []}, "cluster.setupp: unknown key; did you mean 'setup'?"),
    ],
)
def test_a_bad_cluster_section_is_refused_in_one_line_naming_the_file_and_field(
    render, demo, tmp_path, cluster, message
):
    config = stage_config(demo, tmp_path / "bad", cluster=cluster)
    code, script, err = render(config=config)
    assert code == 2 and not script
    assert err == f"error: {config}: {message}" + err[len(f"error: {config}: {message}") :]
    assert len(err.splitlines()) == 1, err


def test_the_configs_of_an_array_must_agree_on_the_job(render, demo, tmp_path):
    first = stage_config(demo, tmp_path / "a", cluster={"mem": "0"})
    second = stage_config(demo, tmp_path / "b", cluster={"mem": "100G"})
    code, script, err = render(config=[first, second])
    assert code == 2
    assert err.strip() == (f"error: --config {second}: its cluster: section differs from "
                           f"{first}'s (one job script runs every task)")  # fmt: skip
