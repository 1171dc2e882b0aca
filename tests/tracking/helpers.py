"""Helpers for the tracking tests, which run against real MLflow: a local sqlite store, or the
real ``mlflow server`` of ``tests/conftest.py`` (started once per session)."""

import tempfile
import time
import uuid
from pathlib import Path

from mlflow import MlflowClient

from pali3_train.config import Config, DataConfig, SourceConfig, TrackingConfig

LOGGER = "pali3_train.tracking"


def tracking_cfg(uri: str | None = None, **kw) -> TrackingConfig:
    """A fresh experiment per test, so that counting runs means something, and a fresh default
    store (``store_dir``), so that no test writes into the checkout's ``runs/``."""
    fresh = {"experiment": f"test-{uuid.uuid4().hex[:8]}", "store_dir": tempfile.mkdtemp()}
    return TrackingConfig(tracking_uri=uri, **{**fresh, **kw})


def metric_history(client: MlflowClient, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def runs_in(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def log_steps(tracker, steps) -> dict[int, float]:
    values = {}
    for step in steps:
        values[step] = 1.0 / (step + 1)
        tracker.log_metrics({"loss": values[step], "lr": 1e-4 * step}, step)
    return values


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def fallback_client(run_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{run_dir}/mlflow.db")


def config_with_lists() -> Config:
    source = SourceConfig(name="cc3m", shards="cc-{000..009}.tar", task="caption",
                          languages=("en", "de"))  # fmt: skip
    return Config(data=DataConfig(sources=(source,)))
