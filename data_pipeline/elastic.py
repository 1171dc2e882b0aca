"""Resuming the data on another layout (data-parallel size or workers per rank) with the epoch
in progress still served exactly once.

A worker's state (``mixture.MixtureIterator.state_dict``) says, per source, which positions of
the source's shard sequence it has claimed: its queue's and then ``base + g + t * G`` for its
turns ``t < next_turn``; of those, the open ones are partly read (``[position, taken]``) and the
rest are done. Gathered over every old worker, that splits the sequence up to the *horizon*,
the end of the epoch holding the highest claimed position, into done, partly read and not yet
claimed. What is left of it (the partly read shards, resumed after their ``taken`` samples, and
the unclaimed ones) is dealt round-robin, in position order, to the new layout's workers as a
first queue; after its queue each new worker goes on with the regular sequence from the horizon
(``horizon + g' + t * G'``). Every position below the horizon is thus read once in all, by an
old worker or a new one, and the epochs after it are shared as in any run.

The counters (``health``) carry over once, summed, in global worker 0; each new worker's random
generator is seeded from the seed, the step and its place in the new layout.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pali3_train.data_pipeline.health import Health, total
from pali3_train.data_pipeline.mixture import STATE_VERSION, ResolvedSource, WorkerLayout


def worker_states(pipeline_state: dict) -> list[dict]:
    """The worker states inside one rank's ``DataPipeline.state_dict()`` (torchdata nests them
    one way without DataLoader workers, another with); a worker that never produced a batch
    has none."""
    loader = pipeline_state["loader"]
    if "_snapshot" in loader:
        fetchers = [
            w.get("fetcher_state") for w in loader["_snapshot"]["_worker_snapshots"].values()
        ]
    else:
        fetchers = [loader.get("fetcher_state")]
    return [f["dataset_iter_state"] for f in fetchers if f and f.get("dataset_iter_state")]


def gather(pipeline_states: Sequence[dict]) -> dict[int, dict]:
    """Every old worker's state by its global index, once: the ranks of a tensor-parallel group
    saved copies of one data-parallel rank's. Refuses states of mixed layouts."""
    by_index: dict[int, dict] = {}
    for pipeline_state in pipeline_states:
        for state in worker_states(pipeline_state):
            by_index[WorkerLayout(*state["layout"]).index] = state
    counts = {WorkerLayout(*s["layout"]).count for s in by_index.values()}
    if len(counts) > 1:
        raise ValueError(f"the data states come from several layouts ({sorted(counts)} workers)")
    return by_index


def repartition(
    old: dict[int, dict],
    layouts: Sequence[WorkerLayout],
    sources: Sequence[ResolvedSource],
    seed_words: Sequence[int],
) -> dict[int, dict]:
    """The states that workers ``layouts`` (one rank's, of the new layout) start from, by
    worker id, given every old worker's (``gather``). ``sources``: the mixture's sources of
    positive weight, in mixture order; ``seed_words``: what the new generators are seeded from
    besides the layout (seed, step)."""
    old_count = WorkerLayout(*next(iter(old.values()))["layout"]).count
    left = {s.spec.name: remaining(old, s.spec.name, old_count, len(s.urls)) for s in sources}
    return {w.worker_id: _worker_state(old, w, left, seed_words) for w in layouts}


def _worker_state(
    old: dict[int, dict],
    layout: WorkerLayout,
    left: dict[str, tuple[list[list[int]], int]],
    seed_words: Sequence[int],
) -> dict:
    """Worker ``layout``'s share of what is ``left`` (every ``count``-th item from its index),
    the sequence going on from the horizon; the counters of all old workers if it is global
    worker 0."""
    streams = {
        name: {
            "next_turn": 0,
            "base": horizon,
            "queue": items[layout.index :: layout.count],
            "open": [],
        }
        for name, (items, horizon) in left.items()
    }
    carried = total([s["health"] for s in old.values()]) if layout.index == 0 else Health()
    rng = np.random.Generator(np.random.PCG64([*seed_words, layout.count, layout.index]))
    return {
        "version": STATE_VERSION,
        "layout": [layout.rank, layout.world_size, layout.worker_id, layout.num_workers],
        "rng": rng.bit_generator.state,
        "exhausted": [False] * len(left),
        "streams": streams,
        "health": carried.state_dict(),
    }


def remaining(
    old: dict[int, dict], name: str, old_count: int, shard_count: int
) -> tuple[list[list[int]], int]:
    """What the old workers left of source ``name``'s epoch in progress: ``[position, taken]``
    in position order, and the horizon (the position the next epoch starts at)."""
    streams = {g: state["streams"][name] for g, state in old.items()}
    base = next(iter(streams.values())).get("base", 0)  # one layout, one base
    claimed = [
        base + g + (s["next_turn"] - 1) * old_count for g, s in streams.items() if s["next_turn"]
    ]
    horizon = (max(claimed) // shard_count + 1) * shard_count if claimed else base
    left = [list(item) for s in streams.values() for item in [*s.get("queue", []), *s["open"]]]
    for g in range(old_count):  # a worker with no state yet claimed nothing
        turn = streams[g]["next_turn"] if g in streams else 0
        left += [[p, 0] for p in range(base + g + turn * old_count, horizon, old_count)]
    return sorted(left), horizon
