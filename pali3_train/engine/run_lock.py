"""One job at a time per run directory.

Two jobs training into one run directory (a resumed job started while the old one still runs,
the same config submitted twice) overwrite each other's checkpoints and interleave their
metrics. Rank 0 therefore holds ``<run_dir>/run.lock`` for the whole run: a JSON file naming the
holder (host, pid, job id, start time), created exclusively, its modification time refreshed by
a heartbeat. A second job is refused with the holder named. A lock whose holder is gone is
stale and taken over with a warning: on the same host when its pid no longer runs, from any
host when its heartbeat stopped ``STALE_AFTER_S`` ago. A job restarted under the same id (a
Slurm requeue) is the same job and takes its own lock back at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from pali3_train.engine.distributed import gather_objects

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class RunLocked(RuntimeError):
    """Another live job holds the run directory; the message names it."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # the process's start time: a pid reused by another process is not it
    job: str  # the scheduler's job id, or "-"
    since: str  # when it took the lock (UTC)

    def describe(self) -> str:
        job = f"job {self.job}, " if self.job != "-" else ""
        return f"{job}pid {self.pid} on {self.host}, since {self.since}"


def this_job() -> Holder:
    job = os.environ.get("SLURM_JOB_ID", "-")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    started = psutil.Process().create_time()
    return Holder(socket.gethostname(), os.getpid(), started, job, since)


class RunLock:
    """The held lock: ``acquire`` once, ``release`` when the run ends (also on failure)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.holder = this_job()
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Take the lock, or raise ``RunLocked`` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            current = self._read()
            if current is not None and not self._is_stale(current):
                raise RunLocked(
                    f"{self.path.parent}: run directory in use by {current.describe()}; stop "
                    f"that job or choose another run_dir (a lock whose job died without a "
                    f"trace goes stale {STALE_AFTER_S:.0f} s after its last heartbeat)"
                )
            if current is not None:
                log.warning("taking over the stale lock of %s", current.describe())
            self.path.unlink(missing_ok=True)
        threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        if self._read() == self.holder:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.holder), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> Holder | None:
        """The current holder; None if the file vanished or is unreadable (a holder killed
        while writing it), which counts as stale."""
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _is_stale(self, holder: Holder) -> bool:
        if holder.job != "-" and holder.job == self.holder.job:
            return True  # this job, restarted (requeued): its old ranks are gone
        if holder.host == self.holder.host:
            return not _runs(holder)
        try:
            beat = self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return time.time() - beat > STALE_AFTER_S

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as exc:  # the run goes on; a second job could now take over
                log.warning("run lock heartbeat failed: %s", exc)


def _runs(holder: Holder) -> bool:
    """Whether the holder's process still runs here (a zombie, killed but not yet reaped, does
    not)."""
    try:
        process = psutil.Process(holder.pid)
        return process.create_time() == holder.started and process.status() != "zombie"
    except psutil.NoSuchProcess:
        return False


def lock_run_dir(run_dir: Path, is_main: bool) -> RunLock | None:
    """Collective: rank 0 takes the run directory's lock (returned there, None elsewhere); if
    another job holds it, every rank raises ``RunLocked`` with rank 0's message."""
    lock, refusal = None, None
    if is_main:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunLocked as exc:
            lock, refusal = None, str(exc)
    refusal = gather_objects(refusal)[0]
    if refusal is not None:
        raise RunLocked(refusal)
    return lock
