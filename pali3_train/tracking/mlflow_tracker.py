"""Rank 0's tracker: a run in the configured MLflow store, with a local fallback while that store
is unreachable, replayed into it when it answers again.

Why it looks the way it does:

* Metrics are buffered and written by a background thread with ``log_batch`` every
  ``flush_every_s`` seconds (or every 1000 metrics), so ``log_metrics`` costs a list append; every
  MLflow call runs with short HTTP limits (``outage.HTTP_LIMITS``).
* An unreachable server (connection refused, timeouts, 5xx) switches the tracker to a *fallback
  run* in a sqlite store inside the run directory (``{run_dir}/mlflow.db``), with one warning that
  names the URI. The background thread tries the server again every ``retry_every_s`` seconds;
  when it answers, the fallback run is copied into the server run (params, tags, the full metric
  history, artifacts) and marked done. Fallback runs that a crash or the end of a job left behind
  are replayed by the next job that resumes the same run, so nothing is lost either way.
* ``run_id`` names the server run whenever one is known, and the fallback run otherwise (the server
  was down from the start). A resumed job may pass either: a fallback run id leads to the server
  run it was (or will be) copied into.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pali3_train.config.flatten import PARAM_VALUE_LIMIT
from pali3_train.config.schema import TrackingConfig
from pali3_train.tracking.base import NullTracker, Status, Tracker
from pali3_train.tracking.outage import http_limits, is_outage
from pali3_train.tracking.store import (
    METRICS_PER_BATCH,
    TAG_VALUE_LIMIT,
    Store,
    artifact_root,
    chunks,
    local_path,
    safe_strings,
    sqlite_store_uri,
    store_uri,
)

if TYPE_CHECKING:  # mlflow is imported lazily: the no-op tracker must not pay for it
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

# Tags on fallback runs (in the run directory's sqlite store).
REPLAY_TAG = "pali3.replay"  # "pending" until copied into the server run, then "done" (or
# "failed": the server rejected the data, which stays in the fallback store)
REMOTE_RUN_TAG = "pali3.remote_run_id"  # the server run it belongs to, once known
REPLAYED_METRICS_TAG = "pali3.replayed_metrics"  # progress of an interrupted replay


def open_tracker(
    cfg: TrackingConfig,
    run_dir: Path,
    *,
    is_main: bool,
    run_id: str | None = None,
    flush_every_s: float = 10.0,
    retry_every_s: float = 60.0,
) -> Tracker:
    """The tracker for this process. ``run_id`` (from a checkpoint) continues that run.

    The store is ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the checkout's sqlite
    file in ``cfg.store_dir`` (no server needed); while it cannot be reached, a sqlite file in the
    run directory stands in. Raises only for a store that answers but refuses us (bad URI, no
    permission): at start-up that is a configuration error worth stopping for.
    """
    if not is_main or cfg.backend == "none":
        return NullTracker()
    run_dir = Path(run_dir).resolve()
    local = sqlite_store_uri(run_dir)
    uri = store_uri(cfg)
    tracker = MlflowTracker(
        cfg,
        run_dir,
        uri,
        fallback_uri=None if uri == local else local,
        flush_every_s=flush_every_s,
        retry_every_s=retry_every_s,
    )
    tracker.start(run_id)
    return tracker


class MlflowTracker:
    """Rank 0's tracker: a run in the configured store, with a local fallback run while that
    store is unreachable (see the module docstring)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        uri: str,
        *,
        fallback_uri: str | None,
        flush_every_s: float,
        retry_every_s: float,
    ):
        self._cfg = cfg
        self._run_dir = run_dir
        self._uri = uri
        self._fallback_uri = fallback_uri
        self._flush_every_s = flush_every_s
        self._retry_every_s = retry_every_s
        self._fallback_artifacts = (run_dir / "mlartifacts").as_uri()
        self._primary: Store | None = None  # None until the configured store has answered
        self._primary_run: str | None = None
        self._fallback: Store | None = None
        self._local_run: str | None = None  # the fallback run being written, if any
        self._down = False  # True while writes go to the fallback run
        self._last_probe = 0.0
        self._run_name = cfg.run_name
        self._lock = threading.RLock()  # serializes all store access
        self._buffer: list[Metric] = []
        self._buffer_lock = threading.Lock()  # log_metrics only ever waits for this one
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._closed = False
        self._pid = os.getpid()
        self._system_metrics = None  # MLflow's SystemMetricsMonitor, once the server run exists

    @property
    def run_id(self) -> str | None:
        """The server run when known, else the fallback run (the server was down from the start).
        It changes from the latter to the former when the server answers: read it when writing a
        checkpoint. An older fallback id still leads to the right run when resuming."""
        return self._primary_run or self._local_run

    # ---------------------------------------------------------------------------- public API

    def start(self, run_id: str | None) -> None:
        """Open (or continue) the run, falling back to the local store if the server is down."""
        with self._lock, http_limits():
            remote, self._local_run = self._claim(run_id)
            try:
                self._connect(remote)
            except Exception as exc:
                if self._fallback_uri is None or not is_outage(exc):
                    raise
                self._primary_run = self._primary_run or remote
                self._begin_outage(exc)
        self._thread.start()
        atexit.register(self._close_at_exit)

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = safe_strings(params, PARAM_VALUE_LIMIT)
        self._deliver(lambda store, run: store.log_params(run, values), "params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = safe_strings(tags, TAG_VALUE_LIMIT)
        self._deliver(lambda store, run: store.set_tags(run, values), "tags")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
        with self._buffer_lock:
            self._buffer.extend(batch)
            full = len(self._buffer) >= METRICS_PER_BATCH
        if full:
            self._wake.set()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads now (the file may change later), to the server or to the fallback run."""
        if not Path(path).exists():
            log.warning("not logging missing artifact %s", path)
            return
        self._deliver(
            lambda store, run: store.client.log_artifact(run, str(path), artifact_path),
            f"artifact {path}",
        )

    def flush(self) -> None:
        """Write the buffered metrics now (the background thread does it every flush_every_s)."""
        with self._buffer_lock:
            metrics, self._buffer = self._buffer, []
        for chunk in chunks(metrics, METRICS_PER_BATCH):
            self._deliver(
                lambda store, run, c=chunk: store.client.log_batch(run, metrics=c),
                f"{len(chunk)} metrics",
            )

    def close(self, status: Status = "FINISHED") -> None:
        """Flush, try a last time to reach a server that was down, and end the run(s)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        if self._system_metrics is not None:
            self._system_metrics.finish()
        with self._lock, http_limits():
            if self._down:
                self._probe()
            self._end_runs(status)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ------------------------------------------------------------------------------ internals

    def _claim(self, run_id: str | None) -> tuple[str | None, str | None]:
        """(server run to continue, fallback run to keep writing) for a run id from a checkpoint,
        which may name a fallback run."""
        if run_id is None or self._fallback_uri is None:
            return run_id, None
        if not (self._run_dir / "mlflow.db").exists():
            return run_id, None
        fallback = self._open_fallback()
        try:
            run = fallback.client.get_run(run_id)
        except Exception:
            return run_id, None  # not a fallback run: a server run id
        tags = run.data.tags
        pending = tags.get(REPLAY_TAG) == "pending"
        if pending:
            self._run_name = self._run_name or run.info.run_name
        return tags.get(REMOTE_RUN_TAG), run_id if pending else None

    def _connect(self, remote_run: str | None) -> None:
        """Reach the configured store, continue or create the run there, replay fallback runs."""
        if self._primary is None:
            artifacts = artifact_root(self._uri)
            self._primary = Store.open(self._uri, self._cfg.experiment, artifacts)
        primary = self._primary
        name = primary.resume_run(remote_run) if remote_run is not None else None
        if remote_run is not None and name is None:
            log.warning("MLflow run %s not found at %s: starting a new run", remote_run, self._uri)
            remote_run = None
        if remote_run is None:
            remote_run, name = primary.create_run(self._run_name, self._new_run_tags())
        self._primary_run, self._run_name = remote_run, name
        if self._local_run is not None:  # the current fallback run belongs to this server run
            self._fallback.set_tags(self._local_run, {REMOTE_RUN_TAG: remote_run})
        self._replay_pending()
        if self._down:
            log.warning(
                "MLflow tracking server %s is back: replayed the local fallback runs into run %s",
                self._uri,
                remote_run,
            )
        self._down = False
        self._local_run = None
        self._watch_system()

    def _watch_system(self) -> None:
        """Start MLflow's own sampler of CPU, memory, disk, network and (with nvidia-ml-py) GPU
        use into this run's ``system/`` metrics. It ends itself if the store stops answering, for
        the rest of the run."""
        every = self._cfg.system_metrics_every_s
        if every is None or self._system_metrics is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self._primary_run, sampling_interval=every, resume_logging=True, tracking_uri=self._uri
        )
        self._system_metrics.start()

    def _new_run_tags(self) -> dict[str, str]:
        tags = {"pali3.run_dir": str(self._run_dir)}
        if self._cfg.parent_run_id:  # MLflow's own tag: the UI nests the run under its parent
            tags["mlflow.parentRunId"] = self._cfg.parent_run_id
        return tags

    def _open_fallback(self) -> Store:
        if self._fallback is None:
            self._fallback = Store.open(
                self._fallback_uri, self._cfg.experiment, self._fallback_artifacts
            )
        return self._fallback

    def _begin_outage(self, exc: BaseException) -> None:
        """Warn (once per outage) and direct writes to a fallback run in the run directory."""
        log.warning(
            "MLflow tracking server %s unreachable (%s): recording to %s until it answers "
            "again (retrying every %.0f s); training continues",
            self._uri,
            exc,
            self._fallback_uri,
            self._retry_every_s,
        )
        self._down = True
        self._last_probe = time.monotonic()
        fallback = self._open_fallback()
        name = fallback.resume_run(self._local_run) if self._local_run is not None else None
        if name is None:
            tags = {REPLAY_TAG: "pending", **self._new_run_tags()}
            if self._primary_run is not None:
                tags[REMOTE_RUN_TAG] = self._primary_run
            self._local_run, name = fallback.create_run(self._run_name, tags)
        self._run_name = self._run_name or name  # a later server run gets the same name

    def _probe(self) -> None:
        """Try the server again; on success the fallback runs are replayed and writes return to
        it. Any failure just leaves the tracker on the fallback run."""
        self._last_probe = time.monotonic()
        try:
            self._connect(self._primary_run)
        except Exception as exc:
            level = logging.DEBUG if is_outage(exc) else logging.WARNING
            log.log(level, "MLflow tracking server %s: still not usable: %s", self._uri, exc)

    def _replay_pending(self) -> None:
        """Copy every pending fallback run of this server run into it (oldest first)."""
        if self._fallback_uri is None:
            return
        if self._fallback is None and not (self._run_dir / "mlflow.db").exists():
            return
        fallback = self._open_fallback()
        runs = fallback.client.search_runs(
            [fallback.experiment_id],
            filter_string=f"tags.`{REMOTE_RUN_TAG}` = '{self._primary_run}' "
            f"and tags.`{REPLAY_TAG}` = 'pending'",
            order_by=["attributes.start_time ASC"],
        )
        for run in runs:
            try:
                self._copy_run(fallback, run.info.run_id, self._primary, self._primary_run)
                replay = "done"
            except Exception as exc:
                if is_outage(exc):
                    raise  # still pending: the next successful probe retries it
                # The server rejects this run's data: retrying would fail the same way.
                log.warning(
                    "MLflow could not replay fallback run %s into %s (left in %s): %s",
                    run.info.run_id,
                    self._primary_run,
                    self._fallback_uri,
                    exc,
                )
                replay = "failed"
            fallback.set_tags(run.info.run_id, {REPLAY_TAG: replay})
            fallback.client.set_terminated(run.info.run_id)

    def _copy_run(self, src: Store, src_run: str, dst: Store, dst_run: str) -> None:
        """Params, tags, the metric history and the artifacts of ``src_run`` into ``dst_run``.
        Metrics go in a fixed order and the count sent is saved after each batch, so a replay
        cut short by another outage resumes without duplicates."""
        run = src.client.get_run(src_run)
        dst.log_params(dst_run, run.data.params)
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith(("mlflow.", "pali3."))}
        dst.set_tags(dst_run, tags)
        history = [
            m
            for key in sorted(run.data.metrics)
            for m in src.client.get_metric_history(src_run, key)
        ]
        history.sort(key=lambda m: (m.timestamp, m.step, m.key))
        done = int(run.data.tags.get(REPLAYED_METRICS_TAG, 0))
        for start in range(done, len(history), METRICS_PER_BATCH):
            dst.client.log_batch(dst_run, metrics=history[start : start + METRICS_PER_BATCH])
            sent = min(start + METRICS_PER_BATCH, len(history))
            src.set_tags(src_run, {REPLAYED_METRICS_TAG: str(sent)})
        artifacts = local_path(run.info.artifact_uri)
        if artifacts.is_dir() and any(artifacts.iterdir()):
            dst.client.log_artifacts(dst_run, str(artifacts))

    def _deliver(self, write: Callable[[Store, str], None], what: str) -> None:
        """One write, to the server or (while it is unreachable) to the fallback run. Never
        raises: a rejected write is logged and dropped."""
        with self._lock, http_limits():
            if not self._down:
                try:
                    write(self._primary, self._primary_run)
                    return
                except Exception as exc:
                    if self._fallback_uri is None or not is_outage(exc):
                        log.warning("MLflow dropped %s for run %s: %s", what, self.run_id, exc)
                        return
                    try:
                        self._begin_outage(exc)
                    except Exception as exc2:
                        log.warning("MLflow fallback store unusable, dropped %s: %s", what, exc2)
                        return
            try:
                write(self._fallback, self._local_run)
            except Exception as exc:
                log.warning("MLflow fallback store dropped %s: %s", what, exc)

    def _worker(self) -> None:
        """Flush every flush_every_s (sooner when the buffer fills); retry a down server."""
        while not self._stop.is_set():
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
                if self._down and time.monotonic() - self._last_probe >= self._retry_every_s:
                    with self._lock, http_limits():
                        if self._down:
                            self._probe()
            except Exception:  # never let the thread die: log and keep going
                log.exception("MLflow tracker background flush failed")

    def _end_runs(self, status: Status) -> None:
        if not self._down:
            try:
                self._primary.client.set_terminated(self._primary_run, status=status)
            except Exception as exc:
                log.warning("could not end MLflow run %s: %s", self._primary_run, exc)
            return
        log.warning(
            "MLflow tracking server %s still unreachable at close: this run's data stays in %s "
            "(run %s) and is replayed into the server when training resumes with run id %s",
            self._uri,
            self._fallback_uri,
            self._local_run,
            self.run_id,
        )
        try:
            self._fallback.client.set_terminated(self._local_run, status=status)
        except Exception as exc:
            log.warning("could not end fallback MLflow run %s: %s", self._local_run, exc)

    def _close_at_exit(self) -> None:
        """The interpreter is exiting with the tracker open (the loop died without close). A
        forked child (a DataLoader worker) inherits the hook but not the run: it does nothing."""
        if os.getpid() == self._pid:
            self.close("FAILED")
