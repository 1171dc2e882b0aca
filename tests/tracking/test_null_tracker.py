"""The tracker of non-main ranks and of ``backend: none``."""

import pytest

from pali3_train.tracking import NullTracker, open_tracker
from tests.tracking.helpers import tracking_cfg


@pytest.mark.parametrize("is_main,backend", [(False, "mlflow"), (True, "none")])
def test_non_main_rank_and_backend_none_do_nothing(tmp_path, monkeypatch, is_main, backend):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # would fail if contacted
    run_dir = tmp_path / "run"
    tracker = open_tracker(tracking_cfg(backend=backend), run_dir, is_main=is_main, run_id="abc")
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    (tmp_path / "a.txt").write_text("x")
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.set_tags({"t": "v"})
    tracker.log_artifact(tmp_path / "a.txt")
    tracker.close("FAILED")
    assert not run_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
