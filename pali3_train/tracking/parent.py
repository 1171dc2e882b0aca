"""The parent run of a curriculum: its stage runs nest under it in the MLflow UI."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

from pali3_train.config.schema import TrackingConfig
from pali3_train.tracking.base import Status
from pali3_train.tracking.outage import http_limits, is_outage
from pali3_train.tracking.store import (
    KEY_LIMIT,
    METRICS_PER_BATCH,
    Store,
    artifact_root,
    chunks,
    store_uri,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ParentRun:
    """The run a curriculum's stage runs nest under (each stage passes its id as
    ``tracking.parent_run_id``); it holds the curriculum's summary: one metric per stage and
    eval metric, and the results table."""

    store: Store
    run_id: str

    @classmethod
    def open(cls, cfg: TrackingConfig, run_name: str) -> ParentRun | None:
        """The parent run in the stages' store (``store_uri``); None when tracking is off or
        the store cannot be reached: the stages run all the same, unnested."""
        if cfg.backend == "none":
            return None
        uri = store_uri(cfg)
        try:
            with http_limits():
                store = Store.open(uri, cfg.experiment, artifact_root(uri))
                run_id, _ = store.create_run(run_name, {"pali3.curriculum": run_name})
        except Exception as exc:
            if not is_outage(exc):
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
        with http_limits():
            for chunk in chunks(rows, METRICS_PER_BATCH):
                self.store.client.log_batch(self.run_id, metrics=list(chunk))
            for artifact in artifacts:
                if artifact.is_file():
                    self.store.client.log_artifact(self.run_id, str(artifact))
            self.store.client.set_terminated(self.run_id, status)
