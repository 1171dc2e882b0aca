"""Every tracking test picks its store itself: a ``MLFLOW_TRACKING_URI`` from the environment
must not leak in."""

import pytest


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
