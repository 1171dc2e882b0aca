"""The fault campaign's cases: each one breaks a real 2-rank tiny stage-1 run under torchrun (a
kill, a corrupt checkpoint, a full disk, a hostile file) and checks that nothing is lost and
nothing is silently wrong. A case returns a short note on success and raises ``Failed`` (or
``Skipped``, with the reason) otherwise.

``Lab`` holds what the cases share: the demo corpus, a work folder and one uninterrupted
reference run whose losses every resumed run must reproduce exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from pali3_train.engine.checkpoint import COMPLETE, find_latest, verify
from pali3_train.plots import read_metrics
from tests.engine.conftest import ROOT, launch, launch_command, launch_env, stage_config
from tests.mlflow_server import MlflowServer

REFERENCE_STEPS = 6  # checkpoints every 2 steps: step_2, step_4, step_6


class Failed(AssertionError):
    """The case found a fault; the message says which."""


class Skipped(Exception):
    """The case cannot run on this machine; the message says why."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


@dataclass
class Lab:
    demo: object  # data_pipeline.demo_corpus's corpus: sources and tokenizer
    root: Path
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _reference: Path | None = None

    def run_dir(self, name: str) -> Path:
        return self.root / name / "run"

    def config(self, run_dir: Path, **sections) -> Path:
        return stage_config(self.demo, run_dir, **sections)

    def reference(self) -> Path:
        """An uninterrupted run (made once)."""
        if self._reference is None:
            run_dir = self.run_dir("reference")
            result = launch(self.config(run_dir), 2)
            expect(result.returncode == 0, f"the reference run failed: {result.stderr[-2000:]}")
            self._reference = run_dir
        return self._reference

    def copy_of_reference(self, name: str) -> Path:
        run_dir = self.run_dir(name)
        shutil.copytree(self.reference(), run_dir)
        return run_dir


# ---------------------------------------------------------------------------- process helpers


def start(config: Path, *args: str) -> subprocess.Popen:
    """torchrun in its own session (as a user's shell starts it), stderr to a file."""
    log = open(config.with_suffix(".stderr"), "w")
    return subprocess.Popen(launch_command(config, 2, *args), env=launch_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)  # fmt: skip


def stderr_of(config: Path) -> str:
    return config.with_suffix(".stderr").read_text()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str,
             timeout: float = 240) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not condition():
        expect(process.poll() is None,
               f"the run ended (exit {process.returncode}) before {what}")  # fmt: skip
        expect(time.monotonic() < deadline, f"{what} never came")
        time.sleep(0.005)


def wait_for_step(run_dir: Path, process: subprocess.Popen, step: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: max(read_metrics(metrics), default=0) >= step, process, f"step {step}")


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "launcher/run.py" in " ".join(p.cmdline())]  # fmt: skip


def gone_within(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still running (not dead, not zombies) after ``seconds``."""
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return [p for p in alive if _running(p)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_job(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def losses(run_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(run_dir / "metrics.jsonl").items()}


def same_losses(lab: Lab, run_dir: Path) -> None:
    expected, got = losses(lab.reference()), losses(run_dir)
    expect(sorted(got) == sorted(expected), f"steps {sorted(got)}, expected {sorted(expected)}")
    for step, value in expected.items():
        expect(abs(got[step] - value) <= 1e-6, f"step {step}: loss {got[step]} != {value}")


def resume(lab: Lab, run_dir: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    """``--resume auto`` with ``config`` (default: the reference run's settings)."""
    result = launch(config or lab.config(run_dir), 2, "--resume", "auto")
    expect(result.returncode == 0, f"resume failed: {result.stderr[-2000:]}")
    return result


# ------------------------------------------------------------------------------------- kills


def kill_the_job_at_a_random_step(lab: Lab) -> str:
    """SIGKILL to the whole job (its process group, and so every rank through the
    parent-death signal) right after a random step, or in the middle of a random save; the
    resume reproduces the uninterrupted losses."""
    run_dir = lab.run_dir(f"kill-job-{lab.rng.randrange(10**6)}")
    config = lab.config(run_dir)
    process = start(config)
    if lab.rng.random() < 0.5:
        moment = f"after step {lab.rng.randint(1, REFERENCE_STEPS - 1)}"
        wait_for_step(run_dir, process, int(moment.split()[-1]))
    else:
        saving = run_dir / "checkpoints" / f".tmp-step_{lab.rng.choice((2, 4)):08d}"
        moment = f"while writing {saving.name}"
        wait_for(saving.exists, process, saving.name)
    kill_job(process)
    latest = find_latest(run_dir / "checkpoints")
    resume(lab, run_dir)
    same_losses(lab, run_dir)
    return f"killed {moment} (latest: {latest.name if latest else 'none'}); same losses"


def kill_the_launcher_only(lab: Lab) -> str:
    """SIGKILL to torchrun alone: its ranks (in their own session) must not live on."""
    run_dir = lab.run_dir("kill-launcher")
    process = start(lab.config(run_dir, train={"steps": 500}))
    wait_for_step(run_dir, process, 1)
    ranks = ranks_of(process)
    expect(len(ranks) == 2, f"found {len(ranks)} ranks under torchrun")
    process.kill()
    process.wait()
    alive = gone_within(ranks, 15)
    for orphan in alive:
        orphan.kill()
    expect(not alive, f"{len(alive)} rank(s) still running 15 s after the launcher died")
    return "both ranks died with torchrun"


def kill_one_rank(lab: Lab) -> str:
    """SIGKILL to one rank: the job ends (it does not hang), and resumes exactly."""
    run_dir = lab.run_dir("kill-rank")
    process = start(lab.config(run_dir))
    wait_for_step(run_dir, process, lab.rng.randint(1, REFERENCE_STEPS - 2))
    victim = lab.rng.choice(ranks_of(process))
    started = time.monotonic()
    victim.kill()
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_job(process)
        raise Failed("the job was still running 120 s after one rank died") from None
    expect(code != 0, "torchrun reported success after a rank was killed")
    seconds = time.monotonic() - started
    resume(lab, run_dir)
    same_losses(lab, run_dir)
    return f"job ended {seconds:.0f} s after the kill; same losses"


def second_job_on_a_running_run_dir(lab: Lab) -> str:
    """A second job on a run directory in use is refused, naming the holder, and leaves the
    first one running."""
    run_dir = lab.run_dir("second-job")
    config = lab.config(run_dir, train={"steps": 500})
    first = start(config)
    try:
        wait_for_step(run_dir, first, 1)
        holder = json.loads((run_dir / "run.lock").read_text())
        second = launch(config, 2, timeout=120)
        expect(first.poll() is None, "the first job stopped")
        wait_for_step(run_dir, first, max(losses(run_dir)) + 1)
    finally:
        kill_job(first)
    expect(second.returncode != 0, "the second job ran")
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    expect(len(errors) == 1 and f"pid {holder['pid']}" in errors[0],
           f"expected one error line naming pid {holder['pid']}: {errors}")  # fmt: skip
    return errors[0].split(": ", 1)[1][:90] + "..."


# ------------------------------------------------------------------------ broken checkpoints


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(folder: Path) -> str:
    victim = _largest_file(folder)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim.name


def _flip(folder: Path) -> str:
    victim = _largest_file(folder)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one low bit: same size, the kind a bad disk or cable makes
    victim.write_bytes(bytes(data))
    return victim.name


def _delete(folder: Path) -> str:
    victim = folder / "rank00001.json"
    victim.unlink()
    return victim.name


CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    "truncate": _truncate,
    "flip": _flip,
    "delete": _delete,
}


def corrupt_the_latest_checkpoint(how: str) -> Callable[[Lab], str]:
    def case(lab: Lab) -> str:
        """The newest checkpoint damaged: refused by file name when asked for, skipped by
        ``--resume auto`` for the previous good one, which resumes exactly."""
        run_dir = lab.copy_of_reference(f"corrupt-{how}")
        broken = run_dir / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
        name = CORRUPTIONS[how](broken)
        config = lab.config(run_dir, train={"steps": REFERENCE_STEPS + 1})
        refused = launch(config, 2, "--resume", str(broken), timeout=180)
        expect(refused.returncode != 0, "the damaged checkpoint was loaded when named")
        expect(name in refused.stderr, f"the refusal does not name {name}")
        result = resume(lab, run_dir)
        expect("skipping checkpoint" in result.stderr and name in result.stderr,
               f"--resume auto did not say it skipped {name}")  # fmt: skip
        expect("resumed from" in result.stderr and "step_00000004" in result.stderr,
               "--resume auto did not fall back to step 4")  # fmt: skip
        expected = losses(lab.reference())
        got = losses(run_dir)
        for step in (5, 6):
            expect(abs(got[step] - expected[step]) <= 1e-6, f"step {step} differs after resume")
        return f"{name}: refused by name; auto resumed from step_4, same losses"

    case.__name__ = f"corrupt_the_latest_checkpoint_{how}"
    return case


def hostile_pickle_in_a_checkpoint(lab: Lab) -> str:
    """A checkpoint whose file would run code when unpickled (its checksums rewritten to
    match, as an attacker would): refused, and the code never runs."""
    run_dir = lab.copy_of_reference("hostile")
    folder = run_dir / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
    marker = lab.root / "hostile" / "code-ran"
    states = folder / "engine" / "mp_rank_00_model_states.pt"
    payload = torch.load(states, weights_only=False)  # our own file, written by the reference
    payload["x"] = _RunsCode(f"touch {marker}")
    torch.save(payload, states)
    _rewrite_listing(folder)
    config = lab.config(run_dir, train={"steps": REFERENCE_STEPS + 1})
    result = launch(config, 2, "--resume", "auto", timeout=180)
    expect(not marker.exists(), "the checkpoint's code ran")
    expect(result.returncode != 0, "the hostile checkpoint was loaded")
    expect("--trust-checkpoint" in result.stderr and "posix.system" in result.stderr,
           "the refusal does not name the type and the flag")  # fmt: skip
    return "refused (posix.system is not allow-listed); nothing ran"


class _RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _rewrite_listing(folder: Path) -> None:
    import hashlib

    listing = json.loads((folder / COMPLETE).read_text())
    for name, entry in listing["files"].items():
        data = (folder / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / COMPLETE).write_text(json.dumps(listing))
    verify(folder)


# --------------------------------------------------------------------------------- full disk


def _checkpoint_bytes(folder: Path) -> int:
    return sum(e["bytes"] for e in json.loads((folder / COMPLETE).read_text())["files"].values())


@contextlib.contextmanager
def small_file_system(where: Path, size: int) -> Iterator[Path]:
    where.mkdir(parents=True)
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)  # fmt: skip
    if tmpfs.returncode:
        raise Skipped(f"cannot mount a small tmpfs here ({tmpfs.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _stopped_with_step_2_whole(mount: Path, result: subprocess.CompletedProcess) -> None:
    expect(result.returncode == 1, f"exit {result.returncode}, expected 1")
    latest = find_latest(mount)
    expect(latest is not None and latest.name == "step_00000002",
           f"latest is {latest}, expected step_00000002")  # fmt: skip
    verify(latest)


def full_disk(lab: Lab) -> str:
    """Checkpoints on a file system with room for one: the second save is refused before
    writing, naming the folder and the sizes; the run stops and the first checkpoint stays
    whole and ``latest``."""
    size = _checkpoint_bytes(lab.reference() / "checkpoints" / "step_00000002")
    with small_file_system(lab.root / "full-disk" / "fs", int(size * 1.6)) as mount:
        config = lab.config(lab.run_dir("full-disk"), checkpoint={"dir": str(mount)})
        result = launch(config, 2, timeout=300)
        _stopped_with_step_2_whole(mount, result)
        expect("not enough free space" in result.stderr and str(mount) in result.stderr,
               f"no clear message: {result.stderr[-1500:]}")  # fmt: skip
        expect(not list(mount.glob(".tmp-*")), "a half-written checkpoint was left behind")
    return "second save refused before writing; step_2 whole"


def _fill(path: Path) -> None:
    """Take all the room left on ``path``'s file system, in about a millisecond on a tmpfs."""
    chunk = bytes(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            os.posix_fallocate(
                f.fileno(), 0, max(shutil.disk_usage(path.parent).free - (4 << 20), 0)
            )
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def disk_fills_during_a_save(lab: Lab) -> str:
    """The disk fills up while the second checkpoint is being written: the error names the
    file and says the disk is full; the run stops; step 2 stays whole and ``latest``."""
    size = _checkpoint_bytes(lab.reference() / "checkpoints" / "step_00000002")
    with small_file_system(lab.root / "disk-fills" / "fs", size * 4) as mount:
        config = lab.config(lab.run_dir("disk-fills"), checkpoint={"dir": str(mount)})
        process = start(config)
        wait_for((mount / ".tmp-step_00000004").exists, process, "the second save")
        filler = mount / "filler"
        _fill(filler)
        code = process.wait(timeout=180)
        stderr = stderr_of(config)
        filler.unlink()
        _stopped_with_step_2_whole(mount, subprocess.CompletedProcess([], code, "", stderr))
        failure = [line for line in stderr.splitlines() if "saving a checkpoint failed" in line]
        if not failure:  # the save won the race; the next one must then have been refused
            expect("not enough free space" in stderr, f"no clear message: {stderr[-1500:]}")
            return "the save finished first; the next one was refused before writing"
        expect("no space left on the device" in failure[0] and str(mount) in failure[0],
               f"the message names neither file nor cause: {failure[0]}")  # fmt: skip
    return failure[0].split("failed at ", 1)[1][:100]


# ------------------------------------------------------------------------------ tracking server


def tracking_server_killed_mid_run(lab: Lab) -> str:
    """The MLflow server SIGKILLed mid-run and restarted on the same store: training never
    stops, and the run on the server ends up with every step's loss exactly once (replayed
    from the local store while the run goes on, or, if the server came back only after the
    run ended, by the resume that follows)."""
    from mlflow import MlflowClient

    server = MlflowServer(lab.root / "tracking" / "server")
    uri = server.start()
    steps = 60
    run_dir = lab.run_dir("tracking")
    tracking = {"backend": "mlflow", "tracking_uri": uri, "experiment": "campaign"}
    config = lab.config(run_dir, train={"steps": steps}, tracking=tracking,
                        checkpoint={"every_steps": 20})  # fmt: skip
    process = start(config)
    try:
        wait_for_step(run_dir, process, 3)
        server.stop(kill=True)
        down_at = max(losses(run_dir))
        wait_for_step(run_dir, process, down_at + 2)
        server.start()
        code = process.wait(timeout=300)
        expect(code == 0, f"training exited {code} around the outage")
        when = "during the run"
        if "still unreachable at close" in stderr_of(config):
            resume(lab, run_dir, config)
            when = "by the resume"
        client = MlflowClient(uri)
        [experiment] = [e for e in client.search_experiments() if e.name == "campaign"]
        runs = client.search_runs([experiment.experiment_id])
        expect(len(runs) == 1, f"{len(runs)} runs on the server, expected 1")
        history = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
        expect(history == list(range(1, steps + 1)),
               f"loss steps on the server: {history}")  # fmt: skip
    finally:
        if process.poll() is None:
            kill_job(process)
        server.stop()
    return f"server down from step {down_at}; all {steps} losses on it once, replayed {when}"


# ------------------------------------------------------------------------------------- lists


@dataclass(frozen=True)
class Case:
    run: Callable[[Lab], str]
    short: bool  # part of the short form that `make test` runs

    @property
    def name(self) -> str:
        return self.run.__name__


CASES = (
    Case(kill_the_launcher_only, short=True),
    Case(kill_the_job_at_a_random_step, short=True),
    Case(kill_one_rank, short=False),
    Case(second_job_on_a_running_run_dir, short=False),  # the lock's logic: test_run_lock.py
    Case(corrupt_the_latest_checkpoint("flip"), short=True),
    Case(corrupt_the_latest_checkpoint("truncate"), short=False),  # sizes: long tested
    Case(corrupt_the_latest_checkpoint("delete"), short=False),
    Case(hostile_pickle_in_a_checkpoint, short=True),
    Case(full_disk, short=True),
    Case(disk_fills_during_a_save, short=False),
    Case(tracking_server_killed_mid_run, short=False),
)
