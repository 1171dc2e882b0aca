"""The MLflow tracker against real MLflow: the checkout's default sqlite store, and a real
``mlflow server``."""

import logging
from dataclasses import replace
from pathlib import Path

from mlflow import MlflowClient

from pali3_train.config import config_from_dict, flatten_config
from pali3_train.tracking import open_tracker, run_name
from tests.tracking.helpers import (
    LOGGER,
    config_with_lists,
    log_steps,
    metric_history,
    runs_in,
    tracking_cfg,
    wait_until,
)

# ----------------------------------------------------------------------- local default store


def test_runs_of_a_checkout_share_its_store_with_artifacts_beside_it(tmp_path):
    store = tmp_path / "runs"
    cfg = tracking_cfg(run_name="local", store_dir=str(store))
    tracker = open_tracker(cfg, store / "a", is_main=True, flush_every_s=0.1)
    values = log_steps(tracker, range(3))
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt")
    tracker.close()
    second = open_tracker(tracking_cfg(experiment=cfg.experiment, store_dir=str(store)),
                          store / "b", is_main=True)  # fmt: skip
    second.close()

    assert not (store / "a" / "mlflow.db").exists(), "no store per run directory"
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    runs = {run.info.run_id: run for run in runs_in(client, cfg.experiment)}
    assert set(runs) == {tracker.run_id, second.run_id}, "one store shows both runs"
    run = runs[tracker.run_id]
    assert (run.info.run_name, run.info.status) == ("local", "FINISHED")
    assert metric_history(client, run.info.run_id) == sorted(values.items())
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "notes.txt"
    assert artifact.is_relative_to(store / "mlartifacts"), "beside the store, not in ./mlruns"
    assert artifact.read_text() == "hello"


def test_system_metrics_are_sampled_into_the_run(tmp_path):
    cfg = tracking_cfg(store_dir=str(tmp_path), system_metrics_every_s=0.2)
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    wait_until(lambda: "system/cpu_utilization_percentage" in
               client.get_run(tracker.run_id).data.metrics)  # fmt: skip
    tracker.close()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_a_runs_default_name_is_its_run_directory_and_stage(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "runs/demo/stage1"), "stage": {"name": "1"},
                            "tracking": {"store_dir": str(tmp_path / "runs")}})  # fmt: skip
    assert run_name(cfg) == "demo/stage1 (stage 1)"
    elsewhere = replace(cfg, run_dir=str(tmp_path / "scratch" / "try3"))
    assert run_name(replace(elsewhere, stage=replace(cfg.stage, name=None))) == "try3"


# ------------------------------------------------------------------------------ real server


def test_server_round_trip_params_metrics_tags_artifact(tmp_path, mlflow_server):
    cfg = tracking_cfg(mlflow_server, run_name="roundtrip")
    config = config_with_lists()
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1)
    tracker.log_params(flatten_config(config))
    tracker.log_params({"long": "y" * 7000})
    values = log_steps(tracker, [0, 10, 20])
    tracker.set_tags({"stage": "stage1", "world_size": 8})
    (tmp_path / "config.yaml").write_text("model: {}\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    client = MlflowClient(mlflow_server)
    wait_until(lambda: len(client.get_metric_history(tracker.run_id, "loss")) == 3, 5)  # timer
    tracker.close()

    [run] = runs_in(client, cfg.experiment)
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    params = dict(run.data.params)
    long = params.pop("long")
    assert params == flatten_config(config)
    assert len(long) == 6000 and long.endswith("...[truncated from 7000 chars]")
    assert metric_history(client, run.info.run_id) == sorted(values.items())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [0, 10, 20]
    assert run.data.tags["stage"] == "stage1" and run.data.tags["world_size"] == "8"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == "model: {}\n"
    assert not (tmp_path / "run" / "mlflow.db").exists()  # the server alone holds the run


def test_resume_with_run_id_appends_to_the_same_run(tmp_path, mlflow_server, caplog):
    cfg = tracking_cfg(mlflow_server)
    first = open_tracker(cfg, tmp_path / "run", is_main=True, flush_every_s=0.1)
    first.log_params({"train.steps": "100", "train.lr": "0.1"})
    before = log_steps(first, range(0, 3))
    first.close("KILLED")  # preempted

    second = open_tracker(cfg, tmp_path / "run", is_main=True, run_id=first.run_id)
    assert second.run_id == first.run_id
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second.log_params({"train.steps": "200", "train.lr": "0.1"})  # steps raised on resume
    after = log_steps(second, range(3, 6))
    second.close()

    client = MlflowClient(mlflow_server)
    [run] = runs_in(client, cfg.experiment)
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert metric_history(client, run.info.run_id) == sorted({**before, **after}.items())
    assert run.data.params == {"train.steps": "100", "train.lr": "0.1"}
    assert run.data.tags["pali3.changed_param.train.steps"] == "200"
    assert "train.steps" in caplog.text


def test_mlflow_tracking_uri_env_is_honoured(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = tracking_cfg()
    tracker = open_tracker(cfg, tmp_path / "run", is_main=True)
    log_steps(tracker, range(2))
    tracker.close()
    [run] = runs_in(MlflowClient(mlflow_server), cfg.experiment)
    assert run.info.run_id == tracker.run_id
    assert not (tmp_path / "run").exists()
