"""A real ``mlflow server`` process for tests and the fault campaign: started on a port, checked
healthy, stopped gracefully or killed (and restarted on the same port and store, as after a
crash)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pali3_train.engine.distributed import free_port


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> str:
        """Start it and wait until it answers; returns its URI. Raises RuntimeError with the
        server's log if it does not come up."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--default-artifact-root", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # quicker stop
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not up: {self.log()[-3000:]}")
            time.sleep(0.2)
        return self.uri

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM to its session (the server and its workers), SIGKILL if it lingers or if
        ``kill`` (a crash)."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
