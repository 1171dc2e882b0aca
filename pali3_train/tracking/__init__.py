"""Experiment tracking: MLflow on rank 0, a tracker that does nothing on the other ranks.

Training must never wait on, or die of, the tracking server: every tracker method returns quickly
and never raises for tracking trouble. Where each part lives:

* ``base``: ``Tracker``, the interface the training loop calls, and ``NullTracker`` (non-main
  ranks, ``backend: none``; it imports no MLflow, which the other modules import lazily).
* ``mlflow_tracker``: ``open_tracker`` and ``MlflowTracker``: buffered metrics written by a
  background thread, a fallback run in the run directory while the server is unreachable, and
  its replay into the server run when the server answers again.
* ``store``: one MLflow store (a server, or a sqlite file: by default the checkout's, shared by
  every run, ``store_uri``) and our experiment in it, and MLflow's size limits.
* ``outage``: which errors mean the store is down, and the short HTTP limits every MLflow call
  runs with.
* ``parent``: ``ParentRun``, the run a curriculum's stage runs nest under.

The config as MLflow params is ``pali3_train.config.flatten_config``.
"""

from pali3_train.tracking.base import NullTracker, Status, Tracker
from pali3_train.tracking.mlflow_tracker import MlflowTracker, open_tracker
from pali3_train.tracking.parent import ParentRun
from pali3_train.tracking.store import run_name, sqlite_store_uri, store_uri, ui_command

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "ParentRun",
    "Status",
    "Tracker",
    "open_tracker",
    "run_name",
    "sqlite_store_uri",
    "store_uri",
    "ui_command",
]
