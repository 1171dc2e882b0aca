"""Resuming on another layout: the epoch in progress still serves every sample once. Real
pipelines (DataLoader workers included) read part of an epoch on one layout, every rank's
saved state is re-partitioned onto another, and the rest is read there."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest

from pali3_train.data_pipeline.loader import DataPipeline
from tests.data_pipeline.corpus import SOURCES, pipeline

BATCH = 3  # with shards of 5, 4 and 3 samples: stops fall inside shards


def _served(data: DataPipeline, batches: int | None) -> list[tuple[str, int]]:
    return [(k, e) for batch in islice(data, batches) for k, e in zip(batch.keys, batch.epochs)]


def _run(cfg, ranks: int, batches: int | None, mode: str, saved: list[dict] | None = None):
    """Every rank of a layout reads ``batches`` (None: to the end); returns (what was served,
    each rank's state as a checkpoint holds it, the served counters summed over ranks)."""
    served, states, counted = [], [], 0
    for rank in range(ranks):
        data = pipeline(cfg, rank, ranks, BATCH, mode=mode)
        if saved is not None:
            data.load_elastic(saved, step=11)
        served += _served(data, batches - rank % 2 if batches else None)  # ranks stop unevenly
        states.append(json.loads(json.dumps(data.state_dict())))
        counted += data.stats().samples
    return served, states, counted


LAYOUTS = [((2, 2), (3, 0)), ((2, 0), (3, 2)), ((3, 0), (2, 0))]


@pytest.mark.parametrize("old,new", LAYOUTS, ids=lambda layout: f"{layout[0]}x{layout[1]}")
@pytest.mark.parametrize("stop", [1, 4])
def test_an_epoch_resumed_on_another_layout_serves_every_sample_once(corpus, old, new, stop):
    first, states, _ = _run(corpus.config(num_workers=old[1]), old[0], stop, "epoch")
    rest, _, _ = _run(corpus.config(num_workers=new[1]), new[0], None, "epoch", states)
    keys = [k for k, _ in first + rest]
    assert first and rest
    assert Counter(keys).most_common(1)[0][1] == 1, "no sample twice"
    assert set(keys) == corpus.keys(), "none left out"


def test_twice_resharded_still_once(corpus):
    first, states, _ = _run(corpus.config(num_workers=2), 2, 2, "epoch")
    second, states, _ = _run(corpus.config(num_workers=0), 3, 2, "epoch", states)
    rest, _, _ = _run(corpus.config(num_workers=1), 2, None, "epoch", states)
    keys = [k for k, _ in first + second + rest]
    assert Counter(keys).most_common(1)[0][1] == 1 and set(keys) == corpus.keys()


@pytest.mark.parametrize("stop", [3, 25])  # 25 batches of 3 per rank: past the first epoch
def test_training_resumed_on_another_layout_completes_each_epoch_once(corpus, stop):
    """Training never ends: every (sample, epoch) at most once, and each epoch the first layout
    had begun is complete once the new layout has read on."""
    first, states, _ = _run(corpus.config(num_workers=2), 2, stop, "train")
    rest, _, _ = _run(corpus.config(num_workers=0), 3, 40, "train", states)
    served = Counter(first + rest)
    assert served.most_common(1)[0][1] == 1, "no sample twice in one epoch"
    for source in SOURCES:
        begun = max(e for k, e in first if k.startswith(source)) if first else 0
        for epoch in range(begun + 1):
            got = {k for k, e in served if e == epoch and k.startswith(source)}
            assert got == {k for k in corpus.keys() if k.startswith(source)}, (source, epoch)


def test_counters_carry_over_once(corpus):
    """At the epoch's end the new layout's counters, summed over ranks, count the corpus."""
    _, states, _ = _run(corpus.config(num_workers=2), 2, 3, "epoch")
    _, _, counted = _run(corpus.config(num_workers=0), 3, None, "epoch", states)
    assert counted == len(corpus.keys())


def _as_version_1(state: dict) -> dict:
    """A worker state as version 1 wrote it: no queue, no base."""
    streams = {
        n: {"next_turn": s["next_turn"], "open": s["open"]} for n, s in state["streams"].items()
    }
    return {**state, "version": 1, "streams": streams}


def test_a_version_1_state_still_resumes_exactly(corpus):
    cfg = corpus.config(num_workers=0)
    reference = _served(pipeline(cfg, 1, 2, BATCH), 9)
    first = pipeline(cfg, 1, 2, BATCH)
    list(islice(first, 4))
    state = json.loads(json.dumps(first.state_dict()))
    iterator = state["loader"]["fetcher_state"]
    iterator["dataset_iter_state"] = _as_version_1(iterator["dataset_iter_state"])
    resumed = pipeline(cfg, 1, 2, BATCH)
    resumed.load_state_dict(state)
    assert _served(resumed, 5) == reference[4 * BATCH :]
