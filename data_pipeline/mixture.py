"""The weighted task mixture as a resumable stream of batches, one per DataLoader worker.

Who reads what. Each source's shards form an endless sequence: epoch 0's order, then epoch 1's,
... (in training each epoch is a seeded permutation; in an evaluation pass there is one epoch in
file order). Global worker ``g`` of ``G`` (``G`` = data-parallel ranks x workers per rank) reads
positions ``g, g + G, g + 2G, ...`` of that sequence, so within an epoch every shard goes to
exactly one worker whatever the shard count, and a source with fewer shards than workers still
feeds all of them.

Exact resume. Everything a worker's future output depends on is small and explicit: per source,
which of its positions it has opened and how many samples it has taken from each open shard;
the worker's random generator (source draws, shard interleaving, prompt choices, where a video's
clip starts); its counters.
``MixtureIterator.state_dict()`` captures that after every batch, torchdata's
``StatefulDataLoader`` ships it with the batch to the main process, and on resume each worker
reopens its shards and skips the samples it had already taken. There is no shuffle buffer (its
contents could not be restored without re-reading); samples are mixed instead by drawing from
``data.open_shards_per_source`` open shards per source and by the mixture itself.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pali3_train.config.schema import SourceConfig
from pali3_train.data_pipeline import shards
from pali3_train.data_pipeline.formats import Rejected, prepare_sample
from pali3_train.data_pipeline.health import DataQualityError, Health
from pali3_train.data_pipeline.transforms import Batch, Sample, collate
from pali3_train.tokenizer import Tokenizer

Mode = Literal["train", "epoch"]
STATE_VERSION = 2  # 2 added each source's first queue and base (elastic resume); 1 still loads


@dataclass(frozen=True)
class ResolvedSource:
    spec: SourceConfig
    urls: tuple[str, ...]
    # Every sample a clip of this many frames (the mixture has a video source), or None: images.
    max_frames: int | None = None


@dataclass(frozen=True)
class WorkerLayout:
    """Where a worker sits: data-parallel rank, worker id within the rank and their counts."""

    rank: int
    world_size: int
    worker_id: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker_id

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass
class _OpenShard:
    position: int  # index in the source's endless shard sequence
    url: str
    taken: int  # raw samples already taken (good or bad)
    samples: Iterator[dict] | None = None  # opened lazily, so a restored cursor is cheap


class SourceStream:
    """One source as read by one worker."""

    def __init__(
        self,
        source: ResolvedSource,
        layout: WorkerLayout,
        seed: int,
        mode: Mode,
        open_shards: int,
        health: Health,
        retries: tuple[int, float] = (0, 0.0),
    ):
        self.name = source.spec.name
        self.urls = source.urls
        self.layout, self.seed, self.mode = layout, seed, mode
        self.open_shards = open_shards
        self.health = health
        self.retries, self.retry_delay_s = retries  # for remote shards (shards.read_shard)
        self.next_turn = 0  # this worker's next turn in the sequence: base + g + turn * G
        self.base = 0  # where the sequence starts for this layout: 0, or where an elastic resume
        # moved it (the end of the epoch it resumed in, see elastic.py)
        self.queue: list[list[int]] = []  # [position, taken] to read first: the share of that
        # epoch's remaining shards an elastic resume gave this worker
        self.open: list[_OpenShard] = []
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._empty_in_a_row = 0

    def _shard_at(self, position: int) -> str | None:
        epoch, index = divmod(position, len(self.urls))
        if self.mode == "epoch":
            return self.urls[position] if epoch == 0 else None
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
            self._order_cache = (epoch, rng.permutation(len(self.urls)))
        return self.urls[self._order_cache[1][index]]

    def _fill(self) -> None:
        while len(self.open) < self.open_shards:
            claimed = self._claim_next()
            if claimed is None:
                return
            position, taken = claimed
            self.open.append(_OpenShard(position, self._shard_at(position), taken))

    def _claim_next(self) -> tuple[int, int] | None:
        """The next shard to open, (position, samples already taken): the queue's first, then
        the worker's next turn; None past the end of an evaluation pass."""
        if self.queue:
            position, taken = self.queue.pop(0)
            return position, taken
        position = self.base + self.layout.index + self.next_turn * self.layout.count
        if self._shard_at(position) is None:
            return None
        self.next_turn += 1
        return position, 0

    def next_raw(self, rng: np.random.Generator) -> dict | None:
        """The next raw sample, drawn from one of the open shards; None once an evaluation pass
        has read all of this worker's shards."""
        while True:
            self._fill()
            if not self.open:
                return None
            shard = (
                self.open[int(rng.integers(len(self.open)))] if len(self.open) > 1 else self.open[0]
            )
            if shard.samples is None:
                shard.samples = shards.read_shard(
                    shard.url, shard.taken, self._shard_error, self.retries, self.retry_delay_s
                )
            raw = next(shard.samples, None)
            if raw is not None:
                raw["__epoch__"] = shard.position // len(self.urls)
                shard.taken += 1
                self._empty_in_a_row = 0
                return raw
            self.open.remove(shard)
            self._check_not_all_empty(shard)

    def _check_not_all_empty(self, shard: _OpenShard) -> None:
        self._empty_in_a_row = self._empty_in_a_row + 1 if shard.taken == 0 else 0
        if self._empty_in_a_row > len(self.urls) + self.open_shards:
            raise DataQualityError(
                f"source {self.name}: no readable sample in {self._empty_in_a_row} shards in a "
                f"row (last {shard.url})"
            )

    def _shard_error(self, url: str, message: str) -> None:
        self.health.record_skip(self.name, "unreadable_shard", url, "-", message)

    def state_dict(self) -> dict:
        return {
            "next_turn": self.next_turn,
            "base": self.base,
            "queue": self.queue,
            "open": [[s.position, s.taken] for s in self.open],
        }

    def load_state_dict(self, state: dict) -> None:
        self.next_turn = state["next_turn"]
        self.base = state.get("base", 0)  # absent in version 1
        self.queue = [list(item) for item in state.get("queue", [])]
        self.open = [_OpenShard(p, self._shard_at(p), taken) for p, taken in state["open"]]


@dataclass
class MixtureDataset(IterableDataset):
    """Batches of one data-parallel rank; iterate it through ``StatefulDataLoader`` (see
    ``loader.DataPipeline``), which runs one ``MixtureIterator`` per worker."""

    sources: tuple[ResolvedSource, ...]
    tokenizer_path: str
    image_size_px: int
    max_prompt_tokens: int
    max_target_tokens: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    mode: Mode
    open_shards_per_source: int
    max_skip_fraction: float
    skip_check_min_samples: int
    read_retries: int = 0
    read_retry_delay_s: float = 0.0
    # worker id -> the state it starts from: an elastic resume's re-partition (elastic.py)
    initial_states: dict[int, dict] | None = None

    def __iter__(self) -> MixtureIterator:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        layout = WorkerLayout(self.rank, self.world_size, worker_id, num_workers)
        return MixtureIterator(self, layout)


class MixtureIterator:
    """The stream of one worker: draws a source by weight, takes its next sample, formats and
    decodes it (skipping and counting what is unusable), and groups samples into batches."""

    def __init__(self, dataset: MixtureDataset, layout: WorkerLayout):
        self.ds = dataset
        self.layout = layout
        self.tokenizer = Tokenizer.load(dataset.tokenizer_path)
        self.health = Health()
        self.rng = np.random.Generator(
            np.random.PCG64([dataset.seed, layout.rank, layout.worker_id])
        )
        self.sources = [s for s in dataset.sources if s.spec.weight > 0]
        retries = (dataset.read_retries, dataset.read_retry_delay_s)
        self.streams = [
            SourceStream(
                s,
                layout,
                dataset.seed,
                dataset.mode,
                dataset.open_shards_per_source,
                self.health,
                retries,
            )
            for s in self.sources
        ]
        self.weights = np.array([s.spec.weight for s in self.sources], dtype=np.float64)
        self.exhausted = np.zeros(len(self.sources), dtype=bool)
        if dataset.initial_states and layout.worker_id in dataset.initial_states:
            self.load_state_dict(dataset.initial_states[layout.worker_id])

    def __iter__(self) -> MixtureIterator:
        return self

    def __next__(self) -> Batch:
        samples: list[Sample] = []
        while len(samples) < self.ds.batch_size:
            sample = self._next_sample()
            if sample is None:
                break
            samples.append(sample)
        if not samples:
            raise StopIteration
        return collate(
            samples,
            self.tokenizer,
            self.ds.max_prompt_tokens,
            self.ds.max_target_tokens,
            self.layout.index,
            self.health.state_dict(),
        )

    def _next_sample(self) -> Sample | None:
        while not self.exhausted.all():
            weights = np.where(self.exhausted, 0.0, self.weights).cumsum()
            i = int(np.searchsorted(weights, self.rng.random() * weights[-1], side="right"))
            raw = self.streams[i].next_raw(self.rng)
            if raw is None:
                self.exhausted[i] = True
                continue
            sample = self._prepare(self.sources[i], raw)
            self.health.check(self.ds.max_skip_fraction, self.ds.skip_check_min_samples)
            if sample is not None:
                return sample
        return None

    def _prepare(self, source: ResolvedSource, raw: dict) -> Sample | None:
        spec, centred = source.spec, self.ds.mode == "epoch"  # an evaluation pass centres clips
        try:
            sample = prepare_sample(
                spec, raw, self.rng, self.ds.image_size_px, source.max_frames, centred
            )
        except Rejected as exc:
            key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
            self.health.record_skip(spec.name, exc.reason, url, key, exc.detail)
            return None
        self.health.record_served(spec.name)
        return sample

    # ------------------------------------------------------------------------- resumable state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "layout": [
                self.layout.rank,
                self.layout.world_size,
                self.layout.worker_id,
                self.layout.num_workers,
            ],
            "rng": self.rng.bit_generator.state,
            "exhausted": self.exhausted.tolist(),
            "streams": {s.name: s.state_dict() for s in self.streams},
            "health": self.health.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"data state version {state.get('version')}, expected {STATE_VERSION}")
        saved = WorkerLayout(*state["layout"])
        if (saved.world_size, saved.num_workers) != (
            self.layout.world_size,
            self.layout.num_workers,
        ):
            raise ValueError(
                f"the data state was saved with {saved.world_size} data-parallel ranks x "
                f"{saved.num_workers} workers; this run has {self.layout.world_size} x "
                f"{self.layout.num_workers} (set data.num_workers to match to resume exactly)"
            )
        names = sorted(s.name for s in self.streams)
        if sorted(state["streams"]) != names:
            raise ValueError(
                f"the data state has sources {sorted(state['streams'])}; the mixture has {names}"
            )
        self.rng.bit_generator.state = state["rng"]
        self.exhausted = np.array(state["exhausted"], dtype=bool)
        for stream in self.streams:
            stream.load_state_dict(state["streams"][stream.name])
        self.health.load_state_dict(state["health"])
