"""The data pipeline a trainer holds: the mixture checked and resolved, read by DataLoader
workers, with a state that a checkpoint can store and a run can resume from exactly.

    pipeline = DataPipeline(cfg.data, image_size_px=224, seed=0, batch_size=8,
                            dp_rank=0, dp_size=8, mode="train", device="cuda")
    for batch in pipeline: ...                      # on the device, images normalised
    checkpoint["data"] = pipeline.state_dict()      # plain JSON-able dict
    pipeline.load_state_dict(checkpoint["data"])    # before iterating again

Ranks that share a tensor-parallel group must see the same data: pass the *data-parallel* rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from pali3_train.config import ConfigError
from pali3_train.config.schema import DataConfig, has_video
from pali3_train.data_pipeline import elastic, shards
from pali3_train.data_pipeline.health import SKIP_REASONS, Health, total
from pali3_train.data_pipeline.mixture import MixtureDataset, Mode, ResolvedSource, WorkerLayout
from pali3_train.data_pipeline.tasks import template_error
from pali3_train.data_pipeline.transforms import Batch, model_input


def resolve_sources(
    data: DataConfig, where: str = "config", field: str = "data.sources"
) -> tuple[ResolvedSource, ...]:
    """Expand every source's shard pattern and check what can be checked before training:
    local shards exist, prompt templates fit their task, a tokenizer is named. With a video
    source every source reads clips of ``data.max_frames``. Errors name the field
    (``data.sources[2].shards``, or under ``field``); ``where`` names the file."""
    if not data.sources:
        raise ConfigError(where, field, "the mixture has no sources")
    if not data.tokenizer_path:
        raise ConfigError(where, "data.tokenizer_path", "must name a SentencePiece model")
    resolved = []
    max_frames = data.max_frames if has_video(data) else None
    for i, source in enumerate(data.sources):
        try:
            urls = shards.expand(source.shards)
        except ValueError as exc:  # an unreadable manifest.json
            raise ConfigError(where, f"{field}[{i}].shards", str(exc)) from None
        if not urls:
            raise ConfigError(where, f"{field}[{i}].shards", f"{source.shards!r} holds no .tar")
        missing = shards.missing_local_shards(urls)
        if missing:
            what = "matches no file" if len(missing) == len(urls) else "has missing shards"
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise ConfigError(where, f"{field}[{i}].shards", f"{source.shards!r} {what}: {shown}")
        if source.prompt is not None and (problem := template_error(source.task, source.prompt)):
            raise ConfigError(where, f"{field}[{i}].prompt", problem)
        resolved.append(ResolvedSource(source, tuple(urls), max_frames))
    return tuple(resolved)


def _identity(batch: Batch) -> Batch:
    return batch  # batches are assembled in the workers


@dataclass
class PipelineStats:
    served: dict[str, int]  # source -> samples
    skipped: dict[str, int]  # "source/reason" -> samples

    @property
    def samples(self) -> int:
        return sum(self.served.values())


class DataPipeline:
    """The model-ready batches of one data-parallel rank: infinite and reshuffled each epoch in
    ``train`` mode; one pass in which every sample appears exactly once across ranks in
    ``epoch`` mode.

    Built from the typed data section and what the run adds to it: the image size (the
    stage's ``model.vit.image_size_px``), the seed, and which share this rank reads
    (``dp_rank`` of ``dp_size``: ranks of one tensor-parallel group share theirs). Images leave
    the workers as uint8 (a quarter of float32's bytes between processes) and are normalised
    here, once, on ``device`` in ``image_dtype``: the one place a batch becomes model input.
    With ``served_keys_path`` every batch's keys, sources and epochs are appended there as one
    JSON line (``data.log_served_keys``: an audit of what a run trained on).
    """

    def __init__(
        self,
        data: DataConfig,
        *,
        image_size_px: int,
        seed: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        mode: Mode = "train",
        device: torch.device | str = "cpu",
        image_dtype: torch.dtype = torch.float32,
        where: str = "config",
        served_keys_path: Path | None = None,
    ):
        self.device, self.image_dtype = torch.device(device), image_dtype
        self.served_keys_path = served_keys_path
        self.dataset = MixtureDataset(
            sources=resolve_sources(data, where),
            tokenizer_path=data.tokenizer_path,
            image_size_px=image_size_px,
            max_prompt_tokens=data.max_prompt_tokens,
            max_target_tokens=data.max_target_tokens,
            batch_size=batch_size,
            rank=dp_rank,
            world_size=dp_size,
            seed=seed,
            mode=mode,
            open_shards_per_source=data.open_shards_per_source,
            max_skip_fraction=data.max_skip_fraction,
            skip_check_min_samples=data.skip_check_min_samples,
            read_retries=data.read_retries,
            read_retry_delay_s=data.read_retry_delay_s,
        )
        self.loader = StatefulDataLoader(
            self.dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=data.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if data.num_workers else None,
        )
        self._health: dict[int, dict] = {}  # global worker index -> its latest counters

    def __iter__(self) -> Iterator[Batch]:
        audit = open(self.served_keys_path, "a") if self.served_keys_path else None
        try:
            for batch in self.loader:
                self._health[batch.worker] = batch.health
                if audit:
                    served = {"keys": batch.keys, "sources": batch.sources, "epochs": batch.epochs}
                    audit.write(json.dumps(served) + "\n")
                    audit.flush()  # a killed run keeps what it served
                yield model_input(batch, self.device, self.image_dtype)
        finally:
            if audit:
                audit.close()

    def stats(self) -> PipelineStats:
        """Samples served and skipped by this rank's workers up to the last batch consumed."""
        health: Health = total(list(self._health.values()))
        return PipelineStats(dict(health.served), dict(health.skipped))

    def quality_counts(self) -> dict[str, int]:
        """``stats()`` as metrics: ``data/<source>/served`` and ``data/<source>/skipped/<reason>``
        for every source of the config and every reason of ``health.SKIP_REASONS``, zeros
        included, so that every rank has the same keys in the same order (to sum them over
        ranks in one collective)."""
        stats, counts = self.stats(), {}
        for name in (s.spec.name for s in self.dataset.sources):
            counts[f"data/{name}/served"] = stats.served.get(name, 0)
            for reason in SKIP_REASONS:
                counts[f"data/{name}/skipped/{reason}"] = stats.skipped.get(f"{name}/{reason}", 0)
        return counts

    def state_dict(self) -> dict:
        return {
            "loader": self.loader.state_dict(),
            "health": {str(k): v for k, v in self._health.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._health = {int(k): v for k, v in state["health"].items()}

    def _layouts(self) -> list[WorkerLayout]:
        workers = max(1, self.loader.num_workers)  # without DataLoader workers: one, in-process
        ds = self.dataset
        return [WorkerLayout(ds.rank, ds.world_size, w, workers) for w in range(workers)]

    def resumes_exactly(self, state: dict) -> bool:
        """Whether ``state`` (this rank's, saved) comes from this layout, so that
        ``load_state_dict`` continues it bit for bit; otherwise use ``load_elastic``."""
        saved = [WorkerLayout(*s["layout"]) for s in elastic.worker_states(state)]
        current = self._layouts()[0]
        return bool(saved) and all(
            (s.world_size, s.num_workers) == (current.world_size, current.num_workers)
            for s in saved
        )

    def load_elastic(self, rank_states: list[dict], step: int) -> None:
        """Resume from the saved states of *every* rank of a run on another layout (data-parallel
        size or ``data.num_workers``), re-partitioned so that the epoch in progress still serves
        each sample once (``elastic``); ``step`` seeds the new workers' generators."""
        old = elastic.gather(rank_states)
        if not old:
            return  # nothing was read yet: a fresh start is the same
        sources = [s for s in self.dataset.sources if s.spec.weight > 0]
        seed_words = [self.dataset.seed, step]
        states = elastic.repartition(old, self._layouts(), sources, seed_words)
        self.dataset.initial_states = states
        self._health = {w.index: states[w.worker_id]["health"] for w in self._layouts()}
