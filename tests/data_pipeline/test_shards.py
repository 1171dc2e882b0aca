"""Reading one shard: from any sample on, from local paths and pipes, with damage reported."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.shards import expand, missing_local_shards, read_shard
from data_pipeline.write_shards import write_source
from tests.data_pipeline.corpus import cut_before, example


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
