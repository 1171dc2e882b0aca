"""The data side of launched runs (real ranks under torchrun): data-quality counters in every
step's metrics and in MLflow, and resuming on another data-parallel size with every sample of
the epoch served once."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from pali3_train.data_pipeline.health import SKIP_REASONS
from pali3_train.plots import read_metrics
from tests.engine.conftest import launch, stage_config

SHARD_SAMPLES = 16
# sample index in the damaged shard -> how it is damaged, as the pipeline should count it
DAMAGE = {1: "corrupt_image", 6: "invalid_json", 9: "corrupt_image", 13: "missing_field"}


def _damaged_source(demo, folder: Path) -> dict:
    """The demo's first scenes shard with ``DAMAGE`` done to it, as the one source of a mixture
    (``scenes_caption``)."""
    source = dataclasses.asdict(demo.sources()[0])
    first = sorted(Path(source["shards"]).parent.glob("*.tar"))[0]
    samples = list(wds.WebDataset(str(first), shardshuffle=False))
    assert len(samples) == SHARD_SAMPLES
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "damaged.tar")) as tar:
        for i, sample in enumerate(samples):
            sample = {k: v for k, v in sample.items() if k != "__url__"}
            if DAMAGE.get(i) == "corrupt_image":
                sample["png"] = b"\x89PNG not really"
            elif DAMAGE.get(i) == "invalid_json":
                sample["json"] = b'{"caption": '
            elif DAMAGE.get(i) == "missing_field":
                del sample["png"]
            tar.write(sample)
    return {**source, "shards": str(folder / "damaged.tar")}


def _expected_counts(served: int) -> dict[str, int]:
    """What one worker that reads the damaged shard over and over has served and skipped once
    it has served ``served`` samples: worked out from ``DAMAGE`` alone."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    good, raw = 0, 0
    while good < served:
        reason = DAMAGE.get(raw % SHARD_SAMPLES)
        if reason:
            skipped[reason] += 1
        else:
            good += 1
        raw += 1
    return {"served": served, **{f"skipped/{r}": n for r, n in skipped.items()}}


@pytest.mark.parametrize("tp", [1, 2])
def test_skip_counters_are_in_every_steps_metrics_and_in_mlflow(demo, mlflow_server, tmp_path, tp):
    """Two ranks: as two data-parallel ranks, and as one tensor-parallel pair that reads one
    share of the data (counted once)."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    source = _damaged_source(demo, tmp_path / "damaged")
    data = {"sources": [source], "open_shards_per_source": 1, "max_skip_fraction": 0.5}
    experiment_name = f"data-counts-tp{tp}"
    tracking = {"backend": "mlflow", "tracking_uri": mlflow_server, "experiment": experiment_name}
    parallel = {"tensor_parallel_size": tp}
    config = stage_config(demo, run_dir, data=data, tracking=tracking, parallel=parallel,
                          train={"steps": 5})  # fmt: skip
    result = launch(config, 2)
    assert result.returncode == 0, result.stderr[-5000:]

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3, 4, 5]
    ranks = 2 // tp  # data-parallel
    per_rank_step = 8 // ranks  # the global batch
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    for step, row in rows.items():
        expected = {
            f"data/scenes_caption/{k}": ranks * v
            for k, v in _expected_counts(step * per_rank_step).items()
        }
        got = {k: v for k, v in row.items() if k.startswith("data/")}
        assert got == expected, step
    # by hand, for tp=1: 20 samples served per rank = 12 good of the first pass + 8 of the
    # second, each pass past samples 1 and 9
    assert tp > 1 or rows[5]["data/scenes_caption/skipped/corrupt_image"] == 4 * ranks
    for key in ("served", "skipped/corrupt_image", "skipped/invalid_json"):
        history = client.get_metric_history(run.info.run_id, f"data/scenes_caption/{key}")
        assert {m.step: m.value for m in history} == {
            s: row[f"data/scenes_caption/{key}"] for s, row in rows.items()
        }


def _shard_keys(pattern: str) -> set[str]:
    """The keys a source's shards hold, read straight from the tar files."""
    folder, name = Path(pattern).parent, Path(pattern).name.split("-{")[0]
    return {
        Path(member).name.split(".")[0]
        for shard in folder.glob(f"{name}-*.tar")
        for member in tarfile.open(shard).getnames()
    }


def _served(run_dir: Path) -> Counter:
    """(key, source, epoch) -> times served, from every data-parallel rank's audit log."""
    served: Counter = Counter()
    for log in (run_dir / "served_keys").glob("dp*.jsonl"):
        for line in log.read_text().splitlines():
            batch = json.loads(line)
            served.update(zip(batch["keys"], batch["sources"], batch["epochs"]))
    return served


_ELASTIC_SOURCES = ("digits_caption", "text_ocr")


def _elastic_config(demo, run_dir: Path) -> Path:
    sources = [
        {**dataclasses.asdict(s), "weight": 1.0}
        for s in demo.sources()
        if s.name in _ELASTIC_SOURCES
    ]
    # one open shard per source: each new worker reads its share of the epoch, then goes on,
    # so that the steps after resuming surely finish the epoch (two open shards would
    # interleave its last samples with the next epoch's)
    data = {"sources": sources, "log_served_keys": True, "open_shards_per_source": 1}
    train = {"steps": 3, "global_batch_size": 12, "micro_batch_size": 2}
    return stage_config(demo, run_dir, data=data, train=train, checkpoint={"every_steps": 100})


@pytest.fixture(scope="module")
def stopped_mid_epoch(demo, tmp_path_factory) -> Path:
    """Two ranks that stopped 3 steps in (inside shards), with their checkpoint."""
    run_dir = tmp_path_factory.mktemp("elastic") / "run"
    first = launch(_elastic_config(demo, run_dir), 2)
    assert first.returncode == 0, first.stderr[-5000:]
    return run_dir


@pytest.mark.parametrize(
    "ranks,workers,steps", [(3, 0, 26), (2, 2, 40)], ids=["3-ranks", "2-workers-per-rank"]
)
def test_resuming_on_another_layout_mid_epoch_serves_the_epoch_once(
    demo, stopped_mid_epoch, tmp_path, ranks, workers, steps
):
    """Two ranks stop 3 steps in (inside shards); the run resumes from their checkpoint on three
    ranks, or on two with two DataLoader workers each, and trains on: the first epoch of each
    source is served exactly once over the two runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_mid_epoch, run_dir)
    config = _elastic_config(demo, run_dir)
    sources = yaml.safe_load(config.read_text())["data"]["sources"]
    before = _served(run_dir)

    more = [f"train.steps={steps}", f"data.num_workers={workers}"]
    resumed = launch(config, ranks, "--resume", "auto", "--set", *more)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "re-partitioned" in resumed.stderr
    served = _served(run_dir)
    assert sum(before.values()) == 3 * 12 and sum(served.values()) == steps * 12
    assert served.most_common(1)[0][1] == 1, "no sample twice in one epoch"
    for source in sources:
        name, keys = source["name"], _shard_keys(source["shards"])
        assert 0 < sum(n for (_, s, e), n in before.items() if s == name and e == 0) < len(keys)
        assert {k for k, s, e in served if s == name and e == 0} == keys, name
    final = read_metrics(run_dir / "metrics.jsonl")[steps]
    for source in sources:  # the counters, carried over the resharding, agree with the audit
        audit = sum(n for (_, s, _), n in served.items() if s == source["name"])
        assert final[f"data/{source['name']}/served"] == audit
