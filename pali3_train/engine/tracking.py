"""Experiment tracking for the training engine: MLflow on rank 0, a tracker that does nothing on
the other ranks.

Why it looks the way it does:

* Training must never wait on, or die of, the tracking server. Metrics are buffered and written by
  a background thread with ``log_batch`` every ``flush_every_s`` seconds (or every 1000 metrics),
  so ``log_metrics`` costs a list append. MLflow's own HTTP client retries for minutes by default;
  every MLflow call made here runs with short limits (see ``HTTP_LIMITS``).
* An unreachable server (connection refused, timeouts, 5xx) switches the tracker to a *fallback
  run* in a sqlite store inside the run directory (``{run_dir}/mlflow.db``), with one warning that
  names the URI. The background thread tries the server again every ``retry_every_s`` seconds;
  when it answers, the fallback run is copied into the server run (params, tags, the full metric
  history, artifacts) and marked done. Fallback runs that a crash or the end of a job left behind
  are replayed by the next job that resumes the same run, so nothing is lost either way.
* ``run_id`` names the server run whenever one is known, and the fallback run otherwise (the server
  was down from the start). A resumed job may pass either: a fallback run id leads to the server
  run it was (or will be) copied into.
* Only ``MlflowClient`` is used, never the fluent ``mlflow.start_run`` state, so several trackers
  in one process (tests, evaluation next to training) do not share an "active run".
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Protocol, Sequence
from urllib.parse import unquote, urlparse

from pali3_train.config.loader import to_dict
from pali3_train.config.schema import TrackingConfig

if TYPE_CHECKING:  # mlflow is imported lazily: the no-op tracker must not pay for it
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

Status = Literal["FINISHED", "FAILED", "KILLED"]

# mlflow.utils.validation in 3.17: MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, MAX_ENTITY_KEY_LENGTH,
# MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH (tests check these against the installed mlflow).
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 8000
KEY_LIMIT = 250
METRICS_PER_BATCH = 1000
PARAMS_TAGS_PER_BATCH = 100

# Applied around every MLflow call made here, for variables the user has not set: one retry, no
# backoff sleep before it, 5 s per socket operation. A refused connection fails in milliseconds, a
# silent host in ~10 s (and then only in the background thread, except at open and in the rare
# params/tags/artifact calls). MLflow's defaults (7 retries, backoff 2, 120 s) take minutes.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# Tags on fallback runs (in the run directory's sqlite store).
REPLAY_TAG = "pali3.replay"  # "pending" until copied into the server run, then "done" (or
# "failed": the server rejected the data, which stays in the fallback store)
REMOTE_RUN_TAG = "pali3.remote_run_id"  # the server run it belongs to, once known
REPLAYED_METRICS_TAG = "pali3.replayed_metrics"  # progress of an interrupted replay
CHANGED_PARAM_PREFIX = "pali3.changed_param."  # a resumed run's param that now has another value


# ------------------------------------------------------------------------------------ config


def flatten_config(cfg: Any) -> dict[str, str]:
    """The config as MLflow params: dotted keys (``model.vit.width``), string values, lists as
    compact JSON, values longer than MLflow accepts truncated with a marker (instead of failing)."""
    data = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    flat: dict[str, str] = {}
    _flatten(data, "", flat)
    return flat


def _flatten(data: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            _flatten(value, dotted + ".", out)
        elif isinstance(value, (list, tuple, Mapping)):
            out[dotted] = _truncate(json.dumps(value, separators=(",", ":"), default=str))
        else:
            out[dotted] = _truncate(_PASSWORD_IN_URL.sub(r"\1:***@", str(value)))


# ``scheme://user:password@host``: params are visible to everyone who can read the experiment.
_PASSWORD_IN_URL = re.compile(r"(://[^/:@\s]+):[^@/\s]+@")


def _truncate(value: str, limit: int = PARAM_VALUE_LIMIT) -> str:
    if len(value) <= limit:
        return value
    marker = f"...[truncated from {len(value)} chars]"
    return value[: limit - len(marker)] + marker


# ----------------------------------------------------------------------------------- trackers


class Tracker(Protocol):
    """What the training loop calls. Every method returns quickly and never raises for tracking
    trouble: losing the tracker must not cost a training run."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: Status = "FINISHED") -> None: ...


class NullTracker:
    """Non-main ranks and ``backend: none``: touches no file and imports no MLflow."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: Status = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

    The store is ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the
    run directory (no server needed). Raises only for a store that answers but refuses us (bad
    URI, no permission): at start-up that is a configuration error worth stopping for.
    """
    if not is_main or cfg.backend == "none":
        return NullTracker()
    run_dir = Path(run_dir).resolve()
    local = local_store_uri(run_dir)
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local
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


@dataclasses.dataclass
class ParentRun:
    """The run a curriculum's stage runs nest under (each stage passes its id as
    ``tracking.parent_run_id``); it holds the curriculum's summary: one metric per stage and
    eval metric, and the results table."""

    store: _Store
    run_id: str

    @classmethod
    def open(cls, cfg: TrackingConfig, run_name: str, artifact_root: Path) -> ParentRun | None:
        """None when tracking is off or has no store shared by the stages (each stage then
        writes its own run directory's store) or the store cannot be reached: the stages run
        all the same, unnested."""
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if cfg.backend == "none" or uri is None:
            return None
        try:
            with _http_limits():
                artifacts = Path(artifact_root).resolve().as_uri()
                store = _Store.open(uri, cfg.experiment, artifacts)
                run_id, _ = store.create_run(run_name, {"pali3.curriculum": run_name})
        except Exception as exc:
            if not _is_outage(exc):
                raise
            log.warning("MLflow store %s unreachable (%s): stage runs will not be nested", uri, exc)
            return None
        return cls(store, run_id)

    def finish(
        self, metrics: Mapping[str, float], artifacts: Sequence[Path], status: Status
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key[:KEY_LIMIT], value, now, 0) for key, value in metrics.items()]
        with _http_limits():
            for chunk in _chunks(rows, METRICS_PER_BATCH):
                self.store.client.log_batch(self.run_id, metrics=list(chunk))
            for artifact in artifacts:
                if artifact.is_file():
                    self.store.client.log_artifact(self.run_id, str(artifact))
            self.store.client.set_terminated(self.run_id, status)


def local_store_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


# ------------------------------------------------------------------------- MLflow plumbing


_ENV_LOCK = threading.RLock()
_IN_CALL = threading.local()


class _QuietRetries(logging.Filter):
    """urllib3 warns on every retry; inside our calls the tracker reports an outage itself, once,
    instead of a warning per retry every ``retry_every_s``. Other threads' records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_IN_CALL, "active", False)


_QUIET_RETRIES = _QuietRetries()


@contextmanager
def _http_limits() -> Iterator[None]:
    """Short HTTP retries/timeouts for the MLflow calls inside, restored afterwards. MLflow reads
    them from the environment on every request; a process-wide lock keeps two trackers (or
    threads) from restoring each other's values mid-call. Values the user set are kept."""
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    if _QUIET_RETRIES not in urllib3_log.filters:
        urllib3_log.addFilter(_QUIET_RETRIES)
    with _ENV_LOCK:
        added = [key for key in HTTP_LIMITS if key not in os.environ]
        os.environ.update({key: HTTP_LIMITS[key] for key in added})
        outer, _IN_CALL.active = getattr(_IN_CALL, "active", False), True
        try:
            yield
        finally:
            _IN_CALL.active = outer
            for key in added:
                os.environ.pop(key, None)


def _is_outage(exc: BaseException) -> bool:
    """The store could not be reached or failed on its side (worth a fallback and a retry), as
    opposed to a request it rejected (a bug: retrying the same request will not help)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # Connection errors and timeouts come wrapped as INTERNAL_ERROR (HTTP 500).
        return exc.get_http_status_code() >= 500
    return isinstance(exc, OSError)  # requests' errors are OSErrors


def _status_code(exc: BaseException) -> int:
    from mlflow.exceptions import MlflowException

    return exc.get_http_status_code() if isinstance(exc, MlflowException) else 500


@dataclasses.dataclass
class _Store:
    """One tracking store (a server or a sqlite file) and our experiment in it."""

    uri: str
    client: MlflowClient
    experiment_id: str

    @classmethod
    def open(cls, uri: str, experiment: str, artifact_location: str | None) -> _Store:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception as exc:  # another process created it first
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise exc from None
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
        return cls(uri, client, exp_id)

    def create_run(self, run_name: str | None, tags: Mapping[str, str]) -> tuple[str, str]:
        """(run id, run name): MLflow invents a name when given none."""
        run = self.client.create_run(self.experiment_id, tags=dict(tags), run_name=run_name)
        return run.info.run_id, run.info.run_name

    def resume_run(self, run_id: str) -> str | None:
        """Mark an existing run running again and return its name; None when this store has no
        such (live) run."""
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            if _status_code(exc) >= 500:
                raise
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run.info.run_name

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Params are write-once in MLflow: skip those already logged with the same value, and
        record a changed one (a resumed run with an edited config) as a tag instead of failing."""
        existing = self.client.get_run(run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            log.warning(
                "run %s: params changed since it started, logged as tags %s*: %s",
                run_id,
                CHANGED_PARAM_PREFIX,
                sorted(changed),
            )
            self.set_tags(run_id, {CHANGED_PARAM_PREFIX + k: v for k, v in changed.items()})
        self._log_batch(run_id, params=new)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._log_batch(run_id, tags=tags)

    def _log_batch(
        self, run_id: str, params: Mapping[str, str] | None = None, tags: Mapping | None = None
    ) -> None:
        from mlflow.entities import Param, RunTag

        items = [Param(k, v) for k, v in (params or {}).items()]
        items += [RunTag(k, v) for k, v in (tags or {}).items()]
        for chunk in _chunks(items, PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                run_id,
                params=[i for i in chunk if isinstance(i, Param)],
                tags=[i for i in chunk if isinstance(i, RunTag)],
            )


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _strings(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """MLflow-safe key/value strings: over-long values truncated, over-long keys dropped (a
    rejected key would fail the whole batch)."""
    out = {}
    for key, value in values.items():
        if len(str(key)) > KEY_LIMIT:
            log.warning("dropping tracking key longer than %d chars: %.80s...", KEY_LIMIT, key)
            continue
        out[str(key)] = _truncate(str(value), limit)
    return out


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else Path("/nonexistent")


# --------------------------------------------------------------------------- MLflow tracker


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
        self._artifacts = (run_dir / "mlartifacts").as_uri()
        self._primary: _Store | None = None  # None until the configured store has answered
        self._primary_run: str | None = None
        self._fallback: _Store | None = None
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

    @property
    def run_id(self) -> str | None:
        """The server run when known, else the fallback run (the server was down from the start).
        It changes from the latter to the former when the server answers: read it when writing a
        checkpoint. An older fallback id still leads to the right run when resuming."""
        return self._primary_run or self._local_run

    # ---------------------------------------------------------------------------- public API

    def start(self, run_id: str | None) -> None:
        """Open (or continue) the run, falling back to the local store if the server is down."""
        with self._lock, _http_limits():
            remote, self._local_run = self._claim(run_id)
            try:
                self._connect(remote)
            except Exception as exc:
                if self._fallback_uri is None or not _is_outage(exc):
                    raise
                self._primary_run = self._primary_run or remote
                self._begin_outage(exc)
        self._thread.start()
        atexit.register(self._close_at_exit)

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = _strings(params, PARAM_VALUE_LIMIT)
        self._deliver(lambda store, run: store.log_params(run, values), "params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = _strings(tags, TAG_VALUE_LIMIT)
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
        for chunk in _chunks(metrics, METRICS_PER_BATCH):
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
        with self._lock, _http_limits():
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
            artifacts = None
            if self._fallback_uri is None:  # the run directory's own store
                self._run_dir.mkdir(parents=True, exist_ok=True)
                artifacts = self._artifacts
            self._primary = _Store.open(self._uri, self._cfg.experiment, artifacts)
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

    def _new_run_tags(self) -> dict[str, str]:
        tags = {"pali3.run_dir": str(self._run_dir)}
        if self._cfg.parent_run_id:  # MLflow's own tag: the UI nests the run under its parent
            tags["mlflow.parentRunId"] = self._cfg.parent_run_id
        return tags

    def _open_fallback(self) -> _Store:
        if self._fallback is None:
            self._run_dir.mkdir(parents=True, exist_ok=True)
            self._fallback = _Store.open(self._fallback_uri, self._cfg.experiment, self._artifacts)
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
            level = logging.DEBUG if _is_outage(exc) else logging.WARNING
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
                if _is_outage(exc):
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

    def _copy_run(self, src: _Store, src_run: str, dst: _Store, dst_run: str) -> None:
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
        artifacts = _local_path(run.info.artifact_uri)
        if artifacts.is_dir() and any(artifacts.iterdir()):
            dst.client.log_artifacts(dst_run, str(artifacts))

    def _deliver(self, write: Callable[[_Store, str], None], what: str) -> None:
        """One write, to the server or (while it is unreachable) to the fallback run. Never
        raises: a rejected write is logged and dropped."""
        with self._lock, _http_limits():
            if not self._down:
                try:
                    write(self._primary, self._primary_run)
                    return
                except Exception as exc:
                    if self._fallback_uri is None or not _is_outage(exc):
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
                    with self._lock, _http_limits():
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
