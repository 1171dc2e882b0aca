"""Shard URLs: expanding a source's pattern, and reading one shard from a given sample on.

Reading goes through webdataset's own tar iteration (``tarfile_samples``), so every URL kind it
opens works here too: local paths, ``pipe:`` commands (how S3/GCS buckets are read with their
CLI), http(s). What webdataset does not offer is starting a shard at sample *k* (needed for
exact resume) and telling the caller what went wrong (needed to count skips): both are here.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from pali3_train.data_pipeline.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

# (url, message): reading the shard failed somewhere
ErrorCallback = Callable[[str, str], None]


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def expand(pattern: str) -> list[str]:
    """Brace patterns (``a-{000..127}.tar``) and ``::``-separated lists, as webdataset expands
    them, and local folders: a folder ``write_shards`` wrote stands for the shards its manifest
    lists, any other folder (an img2dataset download) for the ``.tar`` files in it, in name
    order. Local URLs become absolute so they survive a change of working directory."""
    urls = []
    for url in expand_urls(pattern):
        if not is_local(url):
            urls.append(url)
        elif Path(url).is_dir():
            urls += [str(p.absolute()) for p in _folder_shards(Path(url))]
        else:
            urls.append(str(Path(url).absolute()))
    return urls


def _folder_shards(folder: Path) -> list[Path]:
    if (folder / MANIFEST_NAME).is_file():
        return [folder / shard.file for shard in Manifest.read(folder).shards]
    return sorted(folder.glob("*.tar"))


def missing_local_shards(urls: list[str]) -> list[str]:
    return [u for u in urls if is_local(u) and not Path(u).is_file()]


def read_shard(
    url: str, skip: int, on_error: ErrorCallback, retries: int = 0, retry_delay_s: float = 1.0
) -> Iterator[dict]:
    """Raw samples (``{"__key__", "__url__", "<field>": bytes}``) of one shard, from sample
    ``skip`` on.

    A shard that cannot be opened, breaks off, or ends without tar's end-of-archive blocks (a
    cut download, which tar readers otherwise take for a normal end) yields what it can and is
    reported once, when it is exhausted. Reporting at the end makes the count the same whether
    or not a run was interrupted and resumed inside the shard.

    A remote shard (``pipe:``, http) that fails is first reopened up to ``retries`` times, after
    ``retry_delay_s``, then twice that, ...: a network blip is not corruption. Each retry goes
    on after the samples already yielded; the last sample of a failed attempt is held back (it
    may be cut: after the last attempt it goes with the shard's report), so nothing is yielded
    twice, lost or half. A local file is read once: its damage is in the file.
    """
    retries = 0 if is_local(url) else retries
    taken = skip
    for attempt in range(retries + 1):
        problems: list[str] = []
        for sample in _read_attempt(url, taken, problems, hold_back_last=retries > 0):
            taken += 1
            yield sample
        if not problems:
            return
        if attempt < retries:
            delay = retry_delay_s * 2**attempt
            log.warning(
                "reading %s failed (attempt %d of %d: %s); retrying from sample %d in %.1f s",
                url, attempt + 1, retries + 1, problems[0], taken, delay,
            )  # fmt: skip
            time.sleep(delay)
    on_error(url, "; ".join(problems[:3]))


def _read_attempt(url: str, skip: int, problems: list[str], hold_back_last: bool) -> Iterator[dict]:
    """One pass over the shard from sample ``skip``; what went wrong is added to ``problems``.
    With ``hold_back_last`` the last sample is yielded only if the pass had no problem."""

    def handler(exc: Exception) -> bool:
        problems.append(f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")
        return True  # keep going: the caller decides when there is too much damage

    try:
        stream = _TailRecorder(gopen(url), url)
    except Exception as exc:  # gopen raises OSError, ValueError, ... depending on the scheme
        problems.append(f"cannot open: {exc}")
        return
    held: dict | None = None
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        for sample in itertools.islice(group_by_keys(files, handler=handler), skip, None):
            if hold_back_last:
                sample, held = held, sample
            if sample is not None:
                yield sample
        if not problems and not stream.ends_like_a_tar():
            problems.append("truncated: no end-of-archive marker")
    except OSError as exc:  # a pipe: command that failed, noticed at a read after the tar
        handler(exc)
    finally:
        try:
            stream.close()  # a pipe: command that failed raises here
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
    if held is not None and not problems:
        yield held


class _TailRecorder:
    """A read-only stream that remembers its last bytes, to check the tar ended properly."""

    END_OF_ARCHIVE = bytes(1024)  # two zero blocks

    def __init__(self, stream, url: str):
        self.stream, self.url = stream, url
        self.tail = b""

    def __str__(self) -> str:  # webdataset puts the stream in its error messages
        return self.url

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.tail = (self.tail + chunk)[-len(self.END_OF_ARCHIVE) :]
        return chunk

    def ends_like_a_tar(self) -> bool:
        while self.read(1 << 16):  # tar stops reading at the first zero block
            pass
        return self.tail == self.END_OF_ARCHIVE

    def close(self) -> None:
        self.stream.close()
