"""``slurm_cluster`` is a real Slurm cluster: two nodes, multi-node steps, requeue, signals."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def run(cluster, *args: str, timeout: float = 60) -> str:
    result = subprocess.run(args, env=cluster.env(), capture_output=True, text=True,
                            timeout=timeout, cwd=cluster.workdir)  # fmt: skip
    assert result.returncode == 0, f"{args}: {result.stderr}\n{cluster.logs()}"
    return result.stdout


def job_script(folder: Path, name: str, body: str, *sbatch: str) -> Path:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={folder}/{name}.out"]
    path = folder / f"{name}.sh"
    path.write_text("\n".join([*lines, *(f"#SBATCH {s}" for s in sbatch), body, ""]))
    return path


def wait_for(predicate, timeout: float, what: str, cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    queue = run(cluster, "squeue", "-o", "%i %j %T %r")
    pytest.fail(f"{what} not within {timeout} s\n{queue}\n{cluster.logs()}")


def job_state(cluster, job_id: str) -> str:
    out = run(cluster, "scontrol", "show", "job", job_id)
    return out.split("JobState=", 1)[1].split()[0]


def test_two_idle_nodes_in_debug(slurm_cluster):
    print(f"cluster started in {slurm_cluster.start_seconds:.2f} s")
    out = run(slurm_cluster, "sinfo", "-h", "-N", "-o", "%N %R %t %c")
    assert sorted(out.split("\n")[:-1]) == ["n1 debug idle 2", "n2 debug idle 2"]
    assert slurm_cluster.partition == "debug" and slurm_cluster.nodes == ["n1", "n2"]


def test_two_node_job_runs_one_rank_per_node(slurm_cluster, tmp_path):
    script = job_script(
        tmp_path, "ranks",
        "srun --ntasks-per-node=1 bash -c 'echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME'",
        "--nodes=2", "--ntasks-per-node=1",
    )  # fmt: skip
    run(slurm_cluster, "sbatch", "--wait", str(script))
    ranks = sorted((tmp_path / "ranks.out").read_text().split("\n")[:-1])
    assert ranks == ["0 0 n1", "1 1 n2"]


def test_fake_gpus_set_cuda_visible_devices(slurm_cluster):
    out = run(slurm_cluster, "srun", "--nodes=1", "--ntasks=2", "--gpus-per-task=1",
              "bash", "-c", "echo $SLURM_PROCID $CUDA_VISIBLE_DEVICES")  # fmt: skip
    assert sorted(out.split("\n")[:-1]) == ["0 0", "1 1"]  # one fake GPU per task


def test_requeued_job_runs_again_with_restart_count(slurm_cluster, tmp_path):
    runs = tmp_path / "runs.txt"
    script = job_script(
        tmp_path, "requeue",
        f'echo "run ${{SLURM_RESTART_COUNT:-0}}" >> {runs}\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        "  scontrol requeue $SLURM_JOB_ID\n"
        "  sleep 60\n"
        "fi",
        "--open-mode=append",
    )  # fmt: skip
    job_id = run(slurm_cluster, "sbatch", "--parsable", str(script)).strip()
    wait_for(
        lambda: job_state(slurm_cluster, job_id) == "COMPLETED", 60, "requeued job", slurm_cluster
    )
    assert runs.read_text() == "run 0\nrun 1\n"


def test_user_signal_reaches_batch_shell_trap(slurm_cluster, tmp_path):
    ready, caught = tmp_path / "ready", tmp_path / "caught"
    script = job_script(
        tmp_path, "signal",
        f"trap 'echo USR1 > {caught}; kill $child; exit 0' USR1\n"
        "sleep 300 &\n"
        "child=$!\n"
        f"touch {ready}\n"
        "wait",
    )  # fmt: skip
    job_id = run(slurm_cluster, "sbatch", "--parsable", str(script)).strip()
    wait_for(ready.exists, 30, "job start", slurm_cluster)
    run(slurm_cluster, "scancel", "--signal=USR1", "--batch", job_id)
    wait_for(caught.exists, 10, "USR1 in the batch shell", slurm_cluster)
    assert caught.read_text() == "USR1\n"
    wait_for(lambda: job_state(slurm_cluster, job_id) == "COMPLETED", 30, "job end", slurm_cluster)
