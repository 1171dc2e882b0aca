"""One MLflow store (a server or a sqlite file) through ``MlflowClient``, and MLflow's size limits.

Only ``MlflowClient`` is used, never the fluent ``mlflow.start_run`` state, so several trackers in
one process (tests, evaluation next to training) do not share an "active run".
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlparse

from pali3_train.config.flatten import truncate
from pali3_train.config.schema import Config, TrackingConfig
from pali3_train.tracking.outage import status_code

if TYPE_CHECKING:  # mlflow is imported lazily: the no-op tracker must not pay for it
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# mlflow.utils.validation in 3.17: MAX_TAG_VAL_LENGTH, MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH,
# MAX_PARAMS_TAGS_PER_BATCH (tests check these against the installed mlflow). MAX_PARAM_VAL_LENGTH
# is pali3_train.config.flatten.PARAM_VALUE_LIMIT: flatten_config truncates to it too.
TAG_VALUE_LIMIT = 8000
KEY_LIMIT = 250
METRICS_PER_BATCH = 1000
PARAMS_TAGS_PER_BATCH = 100

CHANGED_PARAM_PREFIX = "pali3.changed_param."  # a resumed run's param that now has another value


def sqlite_store_uri(folder: str | Path) -> str:
    """The sqlite store ``<folder>/mlflow.db`` (a run directory's fallback, or a checkout's)."""
    return f"sqlite:///{Path(folder).resolve()}/mlflow.db"


def store_uri(cfg: TrackingConfig) -> str:
    """The store a run of ``cfg`` logs to: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
    the checkout's sqlite file in ``store_dir``."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or sqlite_store_uri(cfg.store_dir)


def run_name(cfg: Config) -> str:
    """A run's default name in a store many runs share: its run directory (relative to the
    store's folder where it lies inside it: ``runs/demo/stage1`` -> ``demo/stage1``) and its
    stage, so the runs of a checkout can be told apart and compared in the UI."""
    run_dir, store = Path(cfg.run_dir).resolve(), Path(cfg.tracking.store_dir).resolve()
    name = str(run_dir.relative_to(store)) if run_dir.is_relative_to(store) else run_dir.name
    return f"{name} (stage {cfg.stage.name})" if cfg.stage.name is not None else name


def ui_command(cfg: TrackingConfig) -> str:
    """How to look at the runs of ``cfg``'s store: the ``mlflow ui`` command for a sqlite file,
    the server's address otherwise."""
    uri = store_uri(cfg)
    if sqlite_path(uri) is None:
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (``sqlite:///relative.db``, ``sqlite:////absolute.db``,
    SQLAlchemy's forms), resolved; None for a server."""
    prefix = "sqlite:///"
    return Path(unquote(uri.removeprefix(prefix))).resolve() if uri.startswith(prefix) else None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of ``uri`` keeps its artifacts: ``mlartifacts/`` beside a sqlite
    file (MLflow's default would be ``./mlruns`` of whatever the working directory is); None
    for a server, which has its own artifact store."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


@dataclasses.dataclass
class Store:
    """One tracking store (a server or a sqlite file) and our experiment in it."""

    uri: str
    client: MlflowClient
    experiment_id: str

    @classmethod
    def open(cls, uri: str, experiment: str, artifact_location: str | None) -> Store:
        from mlflow import MlflowClient

        if (path := sqlite_path(uri)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
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
            if status_code(exc) >= 500:
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
        for chunk in chunks(items, PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                run_id,
                params=[i for i in chunk if isinstance(i, Param)],
                tags=[i for i in chunk if isinstance(i, RunTag)],
            )


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def safe_strings(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """MLflow-safe key/value strings: over-long values truncated, over-long keys dropped (a
    rejected key would fail the whole batch)."""
    out = {}
    for key, value in values.items():
        if len(str(key)) > KEY_LIMIT:
            log.warning("dropping tracking key longer than %d chars: %.80s...", KEY_LIMIT, key)
            continue
        out[str(key)] = truncate(str(value), limit)
    return out


def local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else Path("/nonexistent")
