"""Experiment tracking against real MLflow: a local sqlite store, a real ``mlflow server`` (started
once per session), and that server behind a TCP switch that can refuse connections, to check that
an outage neither stops training nor loses metrics."""

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import mlflow.utils.validation as mlflow_limits
import pytest
from mlflow import MlflowClient

from pali3_train.config import Config, DataConfig, SourceConfig, TrackingConfig
from pali3_train.engine import tracking
from pali3_train.engine.distributed import free_port
from pali3_train.engine.tracking import NullTracker, flatten_config, open_tracker

LOGGER = "pali3_train.engine.tracking"


class Switch:
    """A TCP forwarder to the test server that can be turned off (connections refused, open ones
    cut) and on again: a server outage without restarting the server."""

    def __init__(self, target_uri: str):
        self.target = ("127.0.0.1", int(target_uri.rsplit(":", 1)[1]))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.05)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            server = socket.create_connection(self.target)
            self._conns += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def switch(mlflow_server):
    s = Switch(mlflow_server)
    yield s
    s.down()


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(uri: str | None = None, **kw) -> TrackingConfig:
    """A fresh experiment per test, so that counting runs means something."""
    return TrackingConfig(tracking_uri=uri, experiment=f"test-{uuid.uuid4().hex[:8]}", **kw)


def _history(client: MlflowClient, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _log_steps(tracker, steps) -> dict[int, float]:
    values = {}
    for step in steps:
        values[step] = 1.0 / (step + 1)
        tracker.log_metrics({"loss": values[step], "lr": 1e-4 * step}, step)
    return values


def _wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _config_with_lists() -> Config:
    source = SourceConfig(name="cc3m", shards="cc-{000..009}.tar", task="caption",
                          languages=("en", "de"))  # fmt: skip
    return Config(data=DataConfig(sources=(source,)))


# ------------------------------------------------------------------------- flatten_config


def test_flatten_config_dotted_string_values_and_compact_json_lists():
    flat = flatten_config(_config_with_lists())
    assert flat["model.vit.width"] == "1152"
    assert flat["train.lr"] == "0.0001"
    assert flat["train.adam_betas"] == "[0.9,0.999]"
    assert flat["tracking.tracking_uri"] == "None"
    assert flat["data.sources"].startswith('[{"name":"cc3m","shards":"cc-{000..009}.tar"')
    assert '"languages":["en","de"]' in flat["data.sources"]
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(k.startswith("model.vit.") and k.count(".") != 2 for k in flat)
    secret = flatten_config({"tracking": {"tracking_uri": "https://bob:s3cret@mlflow:5000/x"}})
    assert secret == {"tracking.tracking_uri": "https://bob:***@mlflow:5000/x"}


def test_long_values_are_truncated_with_a_marker_at_mlflows_limits():
    assert tracking.PARAM_VALUE_LIMIT == mlflow_limits.MAX_PARAM_VAL_LENGTH
    assert tracking.TAG_VALUE_LIMIT == mlflow_limits.MAX_TAG_VAL_LENGTH
    assert tracking.KEY_LIMIT == mlflow_limits.MAX_ENTITY_KEY_LENGTH
    assert tracking.METRICS_PER_BATCH == mlflow_limits.MAX_METRICS_PER_BATCH
    assert tracking.PARAMS_TAGS_PER_BATCH == mlflow_limits.MAX_PARAMS_TAGS_PER_BATCH
    flat = flatten_config({"a": {"b": "x" * 10_000}, "empty": {}})
    assert len(flat["a.b"]) == tracking.PARAM_VALUE_LIMIT
    assert flat["a.b"].endswith("...[truncated from 10000 chars]")
    assert flat["empty"] == "{}"


# --------------------------------------------------------------------------- no-op trackers


@pytest.mark.parametrize("is_main,backend", [(False, "mlflow"), (True, "none")])
def test_non_main_rank_and_backend_none_do_nothing(tmp_path, monkeypatch, is_main, backend):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # would fail if contacted
    run_dir = tmp_path / "run"
    tracker = open_tracker(_cfg(backend=backend), run_dir, is_main=is_main, run_id="abc")
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    (tmp_path / "a.txt").write_text("x")
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.set_tags({"t": "v"})
    tracker.log_artifact(tmp_path / "a.txt")
    tracker.close("FAILED")
    assert not run_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ----------------------------------------------------------------------- local default store


def test_default_store_is_sqlite_in_the_run_dir(tmp_path):
    cfg = _cfg(run_name="local")
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1)
    values = _log_steps(tracker, range(3))
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt")
    tracker.close()

    assert (tmp_path / "run" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow.db")
    [run] = _runs(client, cfg.experiment)
    assert run.info.run_id == tracker.run_id
    assert (run.info.run_name, run.info.status) == ("local", "FINISHED")
    assert _history(client, run.info.run_id) == sorted(values.items())
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "notes.txt"
    assert artifact.is_relative_to(tmp_path / "run" / "mlartifacts")
    assert artifact.read_text() == "hello"


# ------------------------------------------------------------------------------ real server


def test_server_round_trip_params_metrics_tags_artifact(tmp_path, mlflow_server):
    cfg = _cfg(mlflow_server, run_name="roundtrip")
    config = _config_with_lists()
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1)
    tracker.log_params(flatten_config(config))
    tracker.log_params({"long": "y" * 7000})
    values = _log_steps(tracker, [0, 10, 20])
    tracker.set_tags({"stage": "stage1", "world_size": 8})
    (tmp_path / "config.yaml").write_text("model: {}\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    client = MlflowClient(mlflow_server)
    _wait_until(lambda: len(client.get_metric_history(tracker.run_id, "loss")) == 3, 5)  # timer
    tracker.close()

    [run] = _runs(client, cfg.experiment)
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    params = dict(run.data.params)
    long = params.pop("long")
    assert params == flatten_config(config)
    assert len(long) == 6000 and long.endswith("...[truncated from 7000 chars]")
    assert _history(client, run.info.run_id) == sorted(values.items())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [0, 10, 20]
    assert run.data.tags["stage"] == "stage1" and run.data.tags["world_size"] == "8"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == "model: {}\n"
    assert not (tmp_path / "run" / "mlflow.db").exists()  # the server alone holds the run


def test_resume_with_run_id_appends_to_the_same_run(tmp_path, mlflow_server, caplog):
    cfg = _cfg(mlflow_server)
    first = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1)
    first.log_params({"train.steps": "100", "train.lr": "0.1"})
    before = _log_steps(first, range(0, 3))
    first.close("KILLED")  # preempted

    second = open_tracker(cfg, tmp_path / "run", is_main=True, run_id=first.run_id)
    assert second.run_id == first.run_id
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second.log_params({"train.steps": "200", "train.lr": "0.1"})  # steps raised on resume
    after = _log_steps(second, range(3, 6))
    second.close()

    client = MlflowClient(mlflow_server)
    [run] = _runs(client, cfg.experiment)
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert _history(client, run.info.run_id) == sorted({**before, **after}.items())
    assert run.data.params == {"train.steps": "100", "train.lr": "0.1"}
    assert run.data.tags["pali3.changed_param.train.steps"] == "200"
    assert "train.steps" in caplog.text


def test_mlflow_tracking_uri_env_is_honoured(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = _cfg()
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True)
    _log_steps(tracker, range(2))
    tracker.close()
    [run] = _runs(MlflowClient(mlflow_server), cfg.experiment)
    assert run.info.run_id == tracker.run_id
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- outages


def _fallback_client(run_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{run_dir}/mlflow.db")


def test_unreachable_server_falls_back_to_the_run_dir_quickly(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = _cfg(uri)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1)
        tracker.log_params({"a": "1"})
        values = _log_steps(tracker, range(5))
        tracker.set_tags({"t": "v"})
        tracker.close()
    assert time.monotonic() - start < 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert uri in warnings[0] and "unreachable" in warnings[0]
    assert sum("unreachable (" in w for w in warnings) == 1  # warned once, not per write

    client = _fallback_client(tmp_path / "run")
    [run] = _runs(client, cfg.experiment)
    assert run.info.run_id == tracker.run_id
    assert _history(client, run.info.run_id) == sorted(values.items())
    assert run.data.params == {"a": "1"} and run.data.tags["t"] == "v"
    assert run.data.tags[tracking.REPLAY_TAG] == "pending"
    assert not any(k in os.environ for k in tracking.HTTP_LIMITS)  # the limits were scoped


def test_silent_server_times_out_quickly(tmp_path, monkeypatch, caplog):
    """A host that accepts connections but never answers: the request timeout, not MLflow's
    default 120 s x 7 retries, bounds the wait."""
    monkeypatch.setitem(tracking.HTTP_LIMITS, "MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setitem(tracking.HTTP_LIMITS, "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            tracker = open_tracker(_cfg(uri), tmp_path / "run", is_main=True)
        assert time.monotonic() - start < 10
        assert tracker.run_id is not None and uri in caplog.text
        tracker.log_metrics({"loss": 1.0}, 1)
        start = time.monotonic()
        tracker.close()  # flush to the fallback run, one last probe of the server (~1 s)
        assert time.monotonic() - start < 5
    history = _fallback_client(tmp_path / "run").get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0)]


def test_outage_mid_run_is_replayed_when_the_server_returns(tmp_path, switch, caplog):
    switch.up()
    cfg = _cfg(switch.uri)
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1,
                           retry_every_s=0.3)  # fmt: skip
    run_id = tracker.run_id
    values = _log_steps(tracker, range(0, 3))
    tracker.flush()

    switch.down()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        start = time.monotonic()
        values |= _log_steps(tracker, range(3, 2003))  # 4000 metrics: background flushes
        assert time.monotonic() - start < 1  # logging never waits for the server
        tracker.flush()
        tracker.set_tags({"during": "outage"})
        assert any(switch.uri in r.getMessage() for r in caplog.records)
        assert (tmp_path / "run" / "mlflow.db").is_file()

        switch.up()
        fallback = _fallback_client(tmp_path / "run")
        [local] = _runs(fallback, cfg.experiment)
        _wait_until(lambda: fallback.get_run(local.info.run_id).data.tags.get(
            tracking.REPLAY_TAG) == "done")  # fmt: skip
    values |= _log_steps(tracker, range(2003, 2005))
    tracker.close()
    assert sum("unreachable (" in r.getMessage() for r in caplog.records) == 1

    assert tracker.run_id == run_id
    client = MlflowClient(mlflow_server_uri(switch))
    [run] = _runs(client, cfg.experiment)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _history(client, run_id) == sorted(values.items())  # every step, once
    assert run.data.tags["during"] == "outage"
    assert fallback.get_run(local.info.run_id).data.tags[tracking.REMOTE_RUN_TAG] == run_id


def test_run_logged_offline_is_replayed_by_the_job_that_resumes_it(tmp_path, switch):
    cfg = _cfg(switch.uri, run_name="offline")
    offline = open_tracker(cfg, tmp_path / "run", is_main=True)  # server down throughout
    offline.log_params({"a": "1"})
    values = _log_steps(offline, range(0, 4))
    (tmp_path / "config.yaml").write_text("x: 1\n")
    offline.log_artifact(tmp_path / "config.yaml")
    offline.close("KILLED")
    local_id = offline.run_id

    switch.up()  # the next job resumes with the id its checkpoint holds: the local one
    resumed = open_tracker(cfg, tmp_path / "run", is_main=True, run_id=local_id)
    server_id = resumed.run_id
    assert server_id != local_id
    values |= _log_steps(resumed, range(4, 6))
    resumed.close()

    again = open_tracker(cfg, tmp_path / "run", is_main=True, run_id=local_id)
    assert again.run_id == server_id  # the old local id leads to the server run
    again.close()

    client = MlflowClient(mlflow_server_uri(switch))
    [run] = _runs(client, cfg.experiment)
    assert run.info.run_id == server_id and run.info.run_name == "offline"
    assert _history(client, server_id) == sorted(values.items())
    assert run.data.params == {"a": "1"}
    assert [a.path for a in client.list_artifacts(server_id)] == ["config.yaml"]
    local = _fallback_client(tmp_path / "run").get_run(local_id)
    assert local.data.tags[tracking.REPLAY_TAG] == "done"


def mlflow_server_uri(switch: Switch) -> str:
    return f"http://127.0.0.1:{switch.target[1]}"
