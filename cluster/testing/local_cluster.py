"""A real two-node Slurm cluster on this one machine, for tests.

slurmctld plus two slurmd daemons (nodes ``n1`` and ``n2``, both at 127.0.0.1 on their own ports),
no munge (``auth/none``, ``cred/none``), no cgroups, everything (config, state, spool, logs) inside
one work folder and on free ports, so several clusters (or a crashed run's leftovers) never collide.
Needs root and Slurm installed (``cluster/testing/install_slurm.sh``); tested with slurm-wlm 22.05.

    cluster = LocalSlurmCluster(tmp_dir).start()      # returns once sinfo shows n1, n2 idle
    subprocess.run(["sbatch", "--wait", "job.sh"], env=cluster.env(), check=True)
    cluster.stop()                                    # scancel, then the daemons and any job steps

Every Slurm client call needs ``SLURM_CONF`` pointing at this cluster's slurm.conf: pass
``env=cluster.env()`` to subprocess (or set ``os.environ["SLURM_CONF"] = str(cluster.conf)``).
Both nodes share one hostname: tell ranks apart by SLURM_NODEID / SLURMD_NODENAME / SLURM_PROCID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

INSTALL_SCRIPT = Path(__file__).resolve().with_name("install_slurm.sh")
# Set in the daemons' environment (and so inherited by slurmstepd) with the pid of the process that
# started them: processes carrying a dead owner's mark are a crashed run's leftovers.
OWNER_VAR = "PALI3_LOCAL_SLURM_OWNER"
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


def install_slurm(timeout: float = 600) -> tuple[bool, str]:
    """Runs install_slurm.sh: (True, "") when Slurm is usable, else (False, its one-line reason)."""
    try:
        result = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"{INSTALL_SCRIPT.name} failed: {error}"
    if result.returncode == 0:
        return True, ""
    lines = (result.stderr or result.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"{INSTALL_SCRIPT.name} exited {result.returncode}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _which(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)
    if path is None:
        raise FileNotFoundError(f"{name} not found: run {INSTALL_SCRIPT}")
    return path


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, _, value in pairs}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _kill_all(pids: set[int], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _pid_alive(pid) and not _is_zombie(pid)}
            time.sleep(0.05)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _processes_of(conf_paths: set[str], owners: set[str] | None = None) -> set[int]:
    """Processes (not this one) whose environment names one of these slurm.conf files, or carries
    the owner mark of one of ``owners``: daemons, slurmstepd, and job tasks (sbatch exports the
    submitter's SLURM_CONF into the job)."""
    found = set()
    me = os.getpid()
    for pid in _processes():
        if pid == me:
            continue
        environ = _environ_of(pid)
        if environ.get("SLURM_CONF") in conf_paths or (owners and environ.get(OWNER_VAR) in owners):
            found.add(pid)
    return found


def kill_orphans() -> set[int]:
    """Kills local test clusters (and their jobs) whose owning process has died, e.g. a pytest run
    that was killed before its teardown. Returns the pids it signalled."""
    dead_owners, confs = set(), set()
    for pid in _processes():
        environ = _environ_of(pid)
        owner = environ.get(OWNER_VAR)
        if owner and owner.isdigit() and not _pid_alive(int(owner)):
            dead_owners.add(owner)
            if "SLURM_CONF" in environ:
                confs.add(environ["SLURM_CONF"])
    if not dead_owners:
        return set()
    pids = _processes_of(confs, dead_owners)
    _kill_all(pids, timeout=1.0)  # slurmstepd ignores SIGTERM: do not wait long for it
    return pids


class LocalSlurmCluster:
    """slurmctld and two slurmd daemons (nodes n1, n2) under ``workdir``; see the module doc."""

    partition = "debug"

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        nodes: tuple[str, ...] = ("n1", "n2"),
        cpus_per_node: int = 2,
        gpus_per_node: int = 0,
        cluster_name: str = "pali3test",
        cred_expire: int = 10,
    ):
        self.workdir = Path(workdir).resolve()
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.cluster_name = cluster_name
        self.cred_expire = cred_expire
        self.conf = self.workdir / "etc" / "slurm.conf"
        self.log_dir = self.workdir / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.start_seconds: float | None = None  # how long start() took
        self.ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        self.node_ports = dict(zip(self.nodes, node_ports))

    # -- configuration -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (and /usr/sbin on PATH): pass to every Slurm client call."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":" + _SBIN_PATH
        return env

    def write_config(self) -> Path:
        w = self.workdir
        spools = [f"spool/{node}" for node in self.nodes]
        for sub in ["etc", "state", "run", "log", "tmp", "gpus", *spools]:
            (w / sub).mkdir(parents=True, exist_ok=True)
        # slurmstepd listens on unix sockets named <spool>/<node>_<job>.<step> (at most 107 bytes).
        if len(f"{w}/spool/{max(self.nodes, key=len)}") > 70:
            raise ValueError(f"work folder path too long for Slurm's step sockets: {w}")
        gres = ""
        if self.gpus_per_node:
            gres = f" Gres=gpu:{self.gpus_per_node}"
            # Fake GPUs: device files that are symlinks to /dev/null. Slurm still binds them to
            # tasks and sets CUDA_VISIBLE_DEVICES (no cgroup device constraint here).
            for i in range(self.gpus_per_node):
                fake = w / "gpus" / f"gpu{i}"
                if not fake.is_symlink():
                    fake.symlink_to("/dev/null")
            files = f"{w}/gpus/gpu[0-{self.gpus_per_node - 1}]"
            (w / "etc" / "gres.conf").write_text(
                f"AutoDetect=off\nNodeName={','.join(self.nodes)} Name=gpu File={files}\n"
            )
        node_lines = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()}"
            f" Port={port} CPUs={self.cpus_per_node} RealMemory=1000{gres} State=UNKNOWN"
            for name, port in self.node_ports.items()
        )
        self.conf.write_text(
            f"""\
# Written by cluster/testing/local_cluster.py: a throwaway two-node test cluster.
ClusterName={self.cluster_name}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# Short credential lifetime: a requeued job may start again ~cred_expire seconds later (the
# default 120 s), but a step launch on a loaded machine must still fit inside it.
AuthInfo=cred_expire={self.cred_expire}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/run/slurmctld.pid
SlurmdPidFile={w}/run/slurmd-%n.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS={w}/tmp
MailProg=/bin/true
# No cgroups: plain process tracking, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={w}/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
KillWait=2
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=10
{"GresTypes=gpu" if self.gpus_per_node else ""}
{node_lines}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        return self.conf

    # -- daemons -------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "ab")
        self._logs.append(log)
        env = self.env()
        env[OWNER_VAR] = str(os.getpid())
        self._procs[name] = subprocess.Popen(
            argv,
            env=env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, timeout: float = 60) -> LocalSlurmCluster:
        """Writes the config, starts the daemons and waits until every node is idle."""
        started = time.monotonic()
        kill_orphans()
        self.write_config()
        conf = str(self.conf)
        try:
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", conf])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", conf])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def node_states(self) -> dict[str, str]:
        """{node: state} as sinfo reports them ("idle", "alloc", "down*"...); {} if unreachable."""
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %t"],
            env=self.env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode:
            return {}
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [name for name, proc in self._procs.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up\n{self.logs()}")
            states = self.node_states()
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        """The last ``tail`` lines of every daemon log, for error messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self, timeout: float = 20) -> None:
        """Cancels every job, stops the daemons, and kills whatever is left of job steps."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            env = self.env()
            subprocess.run(["scancel", "--full", "--quiet", f"--user={os.getuid()}"], env=env,
                           capture_output=True, timeout=30)  # fmt: skip
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env,
                                       capture_output=True, text=True, timeout=30)  # fmt: skip
                if queue.returncode or not queue.stdout.strip():
                    break
                time.sleep(0.2)
        daemons = {proc.pid for proc in self._procs.values() if proc.poll() is None}
        _kill_all(daemons)
        for proc in self._procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # Anything still running under this cluster's config: a slurmstepd or task that outlived
        # its job (e.g. a step that ignored SIGTERM while slurmd was already gone).
        _kill_all(_processes_of({str(self.conf)}), timeout=1.0)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
