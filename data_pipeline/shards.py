"""Shard URLs: expanding a source's pattern, and reading one shard from a given sample on.

Reading goes through webdataset's own tar iteration (``tarfile_samples``), so every URL kind it
opens works here too: local paths, ``pipe:`` commands (how S3/GCS buckets are read with their
CLI), http(s). What webdataset does not offer is starting a shard at sample *k* (needed for
exact resume) and telling the caller what went wrong (needed to count skips): both are here.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

import webdataset as wds
from webdataset.shardlists import expand_urls

# (url, message) for an error that ended or interrupted reading a shard
ErrorCallback = Callable[[str, str], None]


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def expand(pattern: str) -> list[str]:
    """Brace patterns (``a-{000..127}.tar``) and ``::``-separated lists, as webdataset expands
    them; local URLs become absolute so they survive a change of working directory."""
    return [str(Path(u).absolute()) if is_local(u) else u for u in expand_urls(pattern)]


def missing_local_shards(urls: list[str]) -> list[str]:
    return [u for u in urls if is_local(u) and not Path(u).is_file()]


def read_shard(url: str, skip: int, on_error: ErrorCallback) -> Iterator[dict]:
    """Raw samples (``{"__key__", "__url__", "<field>": bytes}``) of one shard, starting after
    the first ``skip`` samples. A missing or truncated shard yields what it can and reports the
    error instead of raising; errors while skipping were reported when those samples were first
    read, so they are not reported again."""
    skipping = [skip > 0]

    def handler(exc: Exception) -> bool:
        if not skipping[0]:
            on_error(url, f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")
        return True  # keep going: the caller decides when there is too much damage

    samples = wds.tariterators.tarfile_samples([{"url": url}], handler=handler)
    for _ in itertools.islice(samples, skip):
        pass
    skipping[0] = False
    yield from samples
