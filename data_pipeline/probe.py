"""Reading a few real samples of each source before anything starts.

A source whose layout does not match its ``format`` (an img2dataset download read as ``pali3``
shards, a caption under another key) would otherwise pass every check, start the job, and reject
every sample until the skip limit stops it. Decoding the first samples of one shard per source
catches that in a second and says what the samples hold instead. A source is refused only when
every sample read was rejected: the odd bad sample is the data-quality counters' business.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from pali3_train.config import ConfigError
from pali3_train.data_pipeline import shards
from pali3_train.data_pipeline.formats import Rejected, members, prepare_sample
from pali3_train.data_pipeline.mixture import ResolvedSource

SAMPLES_READ = 8


def probe_sources(
    sources: tuple[ResolvedSource, ...],
    image_size_px: int,
    where: str,
    field: str = "data.sources",
    remote: bool = False,
) -> None:
    """Refuse (``ConfigError`` on ``<field>[i].format``) a source whose first samples are all
    rejected. Local shards are always read; remote ones (``pipe:``, http) only with ``remote``,
    since every rank runs these checks and a thousand ranks should not all open a bucket."""
    for i, source in enumerate(sources):
        url = source.urls[0]
        if not (remote or shards.is_local(url)):
            continue
        problem = _all_rejected(source, url, image_size_px)
        if problem:
            raise ConfigError(
                where, f"{field}[{i}].format", problem, also=(f"{field}[{i}].fields",)
            )


def _all_rejected(source: ResolvedSource, url: str, image_size_px: int) -> str | None:
    """Why every sample read from ``url`` was rejected, or None if one was usable (or the shard
    gave none: an unreadable or empty shard is counted in training like any other)."""
    raws = list(itertools.islice(shards.read_shard(url, 0, lambda *_: None), SAMPLES_READ))
    reasons: Counter[str] = Counter()
    rng = np.random.default_rng(0)
    for raw in raws:
        try:
            prepare_sample(source.spec, raw, rng, image_size_px, source.max_frames)
            return None
        except Rejected as exc:
            reasons[str(exc)] += 1
    if not raws:
        return None
    commonest = reasons.most_common(1)[0][0]
    return (
        f"all {len(raws)} samples read from {url} would be rejected with format "
        f"{source.spec.format!r}: {commonest} [members: {members(raws[0])}]"
    )
