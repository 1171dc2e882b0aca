"""The run directory's lock (`pali3_train.engine.run_lock`): a live holder refuses a second job
by name; a dead one, a zombie, a silent other host or the same requeued job is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import psutil
import pytest

from pali3_train.engine.run_lock import LOCK_NAME, STALE_AFTER_S, RunLock, RunLocked, this_job


def _held_by(tmp_path, holder) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps(asdict(holder)))


@pytest.fixture
def other_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _holder_of(process):
    return replace(this_job(), pid=process.pid, started=psutil.Process(process.pid).create_time())


def test_a_live_holder_refuses_a_second_job_by_name(tmp_path, other_process):
    _held_by(tmp_path, _holder_of(other_process))
    with pytest.raises(RunLocked, match=f"in use by pid {other_process.pid} on "):
        RunLock(tmp_path).acquire()


def test_a_dead_holder_and_a_zombie_are_taken_over(tmp_path, other_process):
    holder = _holder_of(other_process)
    other_process.kill()
    time.sleep(0.2)  # killed, not yet reaped: a zombie
    assert psutil.Process(other_process.pid).status() == psutil.STATUS_ZOMBIE
    _held_by(tmp_path, holder)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, other_process):
    _held_by(tmp_path, replace(_holder_of(other_process), started=1.0))
    RunLock(tmp_path).acquire()


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_stops(tmp_path):
    _held_by(tmp_path, replace(this_job(), host="elsewhere", pid=1))
    with pytest.raises(RunLocked, match="on elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 1
    os.utime(tmp_path / LOCK_NAME, (old, old))
    RunLock(tmp_path).acquire()


def test_the_same_requeued_job_takes_its_lock_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _held_by(tmp_path, replace(this_job(), host="elsewhere", pid=1))
    RunLock(tmp_path).acquire()
