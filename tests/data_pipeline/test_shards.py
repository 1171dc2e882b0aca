"""Reading one shard: from any sample on, from local paths and pipes, with damage reported."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pali3_train.data_pipeline.shards import expand, missing_local_shards, read_shard
from pali3_train.data_pipeline.write_shards import write_source
from tests.data_pipeline.corpus import cut_before, example, flaky_pipe


def _shard(tmp_path: Path, count: int = 7) -> str:
    manifest = write_source([example("s", i) for i in range(count)], tmp_path, "s", ["ocr"], ["en"])
    return str(tmp_path / manifest.shards[0].file)


def _keys(url: str, skip: int = 0, errors: list | None = None) -> list[str]:
    on_error = (lambda u, m: errors.append((u, m))) if errors is not None else None
    return [s["__key__"] for s in read_shard(url, skip, on_error)]


def test_expand_handles_braces_lists_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand("a-{00..02}.tar::pipe:cat b.tar") == [
        str(tmp_path / "a-00.tar"),
        str(tmp_path / "a-01.tar"),
        str(tmp_path / "a-02.tar"),
        "pipe:cat b.tar",
    ]
    (tmp_path / "a-01.tar").touch()
    assert missing_local_shards(expand("a-{00..01}.tar::s3://x/y.tar")) == [
        str(tmp_path / "a-00.tar")
    ]


def test_starting_at_sample_k_gives_the_tail(tmp_path):
    url = _shard(tmp_path)
    everything = _keys(url, errors=[])
    assert everything == [f"s-{i:05d}" for i in range(7)]
    for skip in (1, 4, 7):
        assert _keys(url, skip, []) == everything[skip:]


def test_pipe_urls_read_the_same_samples(tmp_path):
    url, errors = _shard(tmp_path), []
    assert _keys(f"pipe:cat {url}", 2, errors) == _keys(url, 2, []) and errors == []


def test_a_failing_pipe_and_a_cut_file_are_reported_once(tmp_path):
    errors: list = []
    assert _keys(f"pipe:cat {tmp_path / 'missing.tar'}", 0, errors) == []
    assert len(errors) == 1 and "missing.tar" in errors[0][0]

    url = _shard(tmp_path)
    cut_before(Path(url), "s-00001")
    errors = []
    assert _keys(url, 0, errors) == ["s-00000"]
    assert errors == [(url, "truncated: no end-of-archive marker")]


def test_stopping_early_reports_nothing(tmp_path):
    url, errors = _shard(tmp_path), []
    cut_before(Path(url), "s-00001")
    samples = read_shard(url, 0, lambda u, m: errors.append(m))
    next(samples)
    samples.close()
    assert errors == []


# ------------------------------------------------------------------------- transient failures


def _runs(tmp_path: Path) -> int:
    return int((tmp_path / "runs").read_text())


def _split_by_records(tmp_path: Path) -> str:
    """A shard whose second 10 KiB tar record ends between a sample's two members. A pipe's
    reader hands tar whole records (the last, partial one is lost to the exit error), so a
    pipe that fails after it shows tar a sample cut in half."""
    examples = [example("s", i) for i in range(7)]
    for e in examples:
        e.record["pad"] = "x" * (1100 - len(json.dumps(e.record)))  # json member: 2048 bytes
    manifest = write_source(examples, tmp_path, "s", ["ocr"], ["en"])
    shard = str(tmp_path / manifest.shards[0].file)
    with tarfile.open(shard) as tar:
        assert 2 * tarfile.RECORDSIZE in [m.offset for m in tar.getmembers() if "png" in m.name]
    return shard


@pytest.mark.parametrize("cut", ["nothing", "mid-member", "mid-sample"])
@pytest.mark.parametrize("skip", [0, 2])
def test_a_pipe_that_fails_twice_is_retried_and_read_exactly_once(tmp_path, caplog, cut, skip):
    shard = _split_by_records(tmp_path)
    emitted = {"nothing": 0, "mid-member": 7000, "mid-sample": 2 * tarfile.RECORDSIZE + 3000}
    url = flaky_pipe(tmp_path, shard, 2, emitted[cut])
    errors: list = []
    samples = list(read_shard(url, skip, lambda u, m: errors.append((u, m)), 3, 0.01))
    assert [s["__key__"] for s in samples] == [f"s-{i:05d}" for i in range(skip, 7)]
    assert all({"json", "png"} <= s.keys() for s in samples), "no sample cut in half"
    assert errors == [] and _runs(tmp_path) == 3
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(url in m for m in retries)
    assert "attempt 1 of 4" in retries[0] and "attempt 2 of 4" in retries[1]


def test_a_pipe_that_always_fails_is_reported_once_after_its_retries(tmp_path):
    shard = _shard(tmp_path)
    url = flaky_pipe(tmp_path, shard, 100, Path(shard).stat().st_size // 2)
    errors: list = []
    keys = [s["__key__"] for s in read_shard(url, 0, lambda u, m: errors.append((u, m)), 2, 0)]
    assert _runs(tmp_path) == 3 and len(errors) == 1 and errors[0][0] == url
    assert keys == [f"s-{i:05d}" for i in range(len(keys))], "what came is served once, in order"


def test_a_local_file_is_not_retried(tmp_path, caplog):
    url = _shard(tmp_path)
    cut_before(Path(url), "s-00003")
    errors: list = []
    keys = [s["__key__"] for s in read_shard(url, 0, lambda u, m: errors.append(m), 3, 10.0)]
    assert keys == ["s-00000", "s-00001", "s-00002"]
    assert errors == ["truncated: no end-of-archive marker"]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
