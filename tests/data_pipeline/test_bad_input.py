"""Damaged shards: every kind of damage is skipped, counted by source and reason, and the run
goes on; too much damage stops it, naming the worst shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from pali3_train.data_pipeline import health
from pali3_train.data_pipeline.health import DataQualityError
from tests.data_pipeline.corpus import (
    Corpus,
    cut_before,
    example,
    flaky_pipe,
    img2dataset_sample,
    pipeline,
)

GOOD = 8  # samples per damaged shard before damage
HEALTH_LOGGER = health.__name__


def _write(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)


def _good(source: str, index: int) -> dict:
    e = example(source, index)
    return {"__key__": e.key, "png": e.image, "json": json.dumps(e.record).encode()}


@pytest.fixture
def damaged(corpus: Corpus, tmp_path: Path) -> list[dict]:
    """Source ``cats``: shard 0 with one of each bad-sample kind, shard 1 cut short after 5
    samples, shard 2 intact. Source ``remote``: a pipe: shard that works and one that fails."""
    shard0 = [_good("cats", i) for i in range(GOOD)]
    shard0[1]["png"] = b"\x89PNG not really"  # corrupt image
    shard0[3]["json"] = b'{"caption": '  # invalid JSON
    shard0[5]["json"] = json.dumps({"vqa": {}}).encode()  # no caption field
    del shard0[6]["png"]  # no image member
    _write(tmp_path / "cats-0.tar", shard0)
    _write(tmp_path / "cats-1.tar", [_good("cats", GOOD + i) for i in range(GOOD)])
    cut_before(tmp_path / "cats-1.tar", f"cats-{GOOD + 5:05d}")
    _write(tmp_path / "cats-2.tar", [_good("cats", 2 * GOOD + i) for i in range(GOOD)])
    _write(tmp_path / "remote-0.tar", [_good("remote", i) for i in range(GOOD)])
    return [
        {"name": "cats", "shards": str(tmp_path / "cats-{0..2}.tar"), "task": "caption"},
        {
            "name": "remote",
            "shards": f"pipe:cat {tmp_path / 'remote-0.tar'}::pipe:cat {tmp_path / 'gone.tar'}",
            "task": "caption",
        },
        *Corpus.sources(corpus)[:1],
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_kind_of_damage_is_skipped_and_counted(corpus, damaged, workers):
    cfg = corpus.config(damaged, num_workers=workers, max_skip_fraction=0.5, read_retry_delay_s=0)
    data = pipeline(cfg, 0, 1, 4, mode="epoch")
    keys = [k for batch in data for k in batch.keys]

    bad_in_shard0 = {f"cats-{i:05d}" for i in (1, 3, 5, 6)}
    lost_in_shard1 = {f"cats-{i:05d}" for i in range(GOOD + 5, 2 * GOOD)}
    cats = {f"cats-{i:05d}" for i in range(3 * GOOD)} - bad_in_shard0 - lost_in_shard1
    alpha = {k for k in corpus.keys() if k.startswith("alpha")}
    remote = {f"remote-{i:05d}" for i in range(GOOD)}
    assert sorted(keys) == sorted(cats | alpha | remote), "the run went on past every damage"

    stats = data.stats()
    assert stats.skipped == {
        "cats/corrupt_image": 1,
        "cats/invalid_json": 1,
        "cats/missing_field": 2,
        "cats/unreadable_shard": 1,
        "remote/unreadable_shard": 1,
    }
    assert stats.served == {"cats": len(cats), "alpha": len(alpha), "remote": GOOD}


def test_skips_are_logged_with_shard_and_key(corpus, damaged, caplog):
    cfg = corpus.config(damaged, num_workers=0, max_skip_fraction=0.5, read_retry_delay_s=0)
    list(pipeline(cfg, 0, 1, 4, mode="epoch"))
    lines = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER]
    assert any("'cats-00001'" in m and "cats-0.tar" in m and "corrupt_image" in m for m in lines)
    assert any("gone.tar" in m and "unreadable_shard" in m for m in lines)


@pytest.mark.parametrize("workers", [0, 2])
def test_too_much_damage_stops_the_run_naming_the_worst_shard(corpus, damaged, workers):
    cfg = corpus.config(
        damaged[:1], num_workers=workers, max_skip_fraction=0.1, skip_check_min_samples=8
    )
    with pytest.raises(DataQualityError, match=r"worst shard \S*cats-0.tar with \d+ skips"):
        list(pipeline(cfg, 0, 1, 4, mode="epoch"))


def test_a_training_source_with_nothing_readable_stops_instead_of_spinning(corpus, tmp_path):
    dead = {"name": "dead", "shards": f"pipe:cat {tmp_path / 'gone-{0..2}.tar'}", "task": "ocr"}
    cfg = corpus.config([dead], num_workers=0, max_skip_fraction=1.0, read_retry_delay_s=0)
    with pytest.raises(DataQualityError, match="source dead: no readable sample in"):
        next(iter(pipeline(cfg, 0, 1, 4, mode="train")))


@pytest.mark.parametrize("failures,workers", [(2, 0), (2, 2), (100, 0)])
def test_a_remote_shard_that_fails_is_retried_before_it_counts_as_bad(
    corpus, tmp_path, caplog, failures, workers
):
    """Failing twice then working: every sample once, nothing counted. Always failing: counted
    once, as an unreadable shard named by its URL."""
    _write(tmp_path / "remote-0.tar", [_good("remote", i) for i in range(3 * GOOD)])
    _write(tmp_path / "remote-1.tar", [_good("remote", 3 * GOOD + i) for i in range(GOOD)])
    url = flaky_pipe(tmp_path, str(tmp_path / "remote-0.tar"), failures, 6000)
    remote = {"name": "remote", "shards": f"{url}::pipe:cat {tmp_path}/remote-1.tar",
              "task": "caption"}  # fmt: skip
    cfg = corpus.config([remote], num_workers=workers, read_retries=3, read_retry_delay_s=0.01,
                        max_skip_fraction=1.0)  # fmt: skip
    data = pipeline(cfg, 0, 1, 4, mode="epoch")
    keys = [k for batch in data for k in batch.keys]

    if failures < 3:
        assert sorted(keys) == [f"remote-{i:05d}" for i in range(4 * GOOD)]
        assert data.stats().skipped == {} and data.stats().served == {"remote": 4 * GOOD}
    else:
        assert data.stats().skipped == {"remote/unreadable_shard": 1}
        cut = sorted(k for k in keys if int(k.split("-")[1]) < 3 * GOOD)  # what came before it
        assert cut == [f"remote-{i:05d}" for i in range(len(cut))] and len(cut) < 3 * GOOD
        assert sorted(keys) == cut + [f"remote-{i:05d}" for i in range(3 * GOOD, 4 * GOOD)]
        if workers == 0:
            skips = [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER]
            assert len(skips) == 1 and url in skips[0] and "unreadable_shard" in skips[0]


def test_damage_in_img2dataset_shards_is_skipped_and_counted(corpus, tmp_path):
    samples = [img2dataset_sample(example("dogs", i, image_format="WEBP")) for i in range(GOOD)]
    samples[1]["webp"] = b"RIFF\x00\x00\x00\x00WEBPVP8 broken"  # corrupt image
    del samples[2]["txt"]  # no caption
    samples[4]["txt"] = b"\xff\xfe not UTF-8"
    _write(tmp_path / "dogs-0.tar", samples)
    dogs = {"name": "dogs", "shards": str(tmp_path / "dogs-0.tar"), "task": "caption",
            "format": "img2dataset"}  # fmt: skip
    cfg = corpus.config([dogs], num_workers=0, max_skip_fraction=0.5)
    data = pipeline(cfg, 0, 1, 2, mode="epoch")
    keys = {k for batch in data for k in batch.keys}
    assert keys == {f"dogs-{i:05d}" for i in range(GOOD)} - {f"dogs-{i:05d}" for i in (1, 2, 4)}
    assert data.stats().skipped == {
        "dogs/corrupt_image": 1,
        "dogs/missing_field": 1,
        "dogs/invalid_text": 1,
    }
