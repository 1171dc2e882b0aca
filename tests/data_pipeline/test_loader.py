"""The pipeline end to end on real shards: exactly-once epochs across real ranks and workers,
deterministic training order, mixture weights, exact resume, and refused mixtures."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pali3_train.config import ConfigError
from pali3_train.data_pipeline.health import Health
from pali3_train.data_pipeline.loader import DataPipeline, resolve_sources
from pali3_train.data_pipeline.mixture import SourceStream, WorkerLayout
from pali3_train.data_pipeline.transforms import decode_image, normalize_images
from pali3_train.engine.distributed import free_port
from pali3_train.tokenizer import Tokenizer
from tests.data_pipeline.corpus import COLOURS, pipeline


def _keys(data: DataPipeline, batches: int | None = None) -> list[str]:
    return [k for batch in islice(data, batches) for k in batch.keys]


# ------------------------------------------------------------------------------- exactly once


def _epoch_on_rank(rank: int, world: int, port: int, corpus, workers: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        keys = _keys(pipeline(corpus.config(num_workers=workers), rank, world, 4, mode="epoch"))
        gathered: list[list[str] | None] = [None] * world
        dist.all_gather_object(gathered, keys)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1)])
def test_an_epoch_serves_every_sample_exactly_once_across_ranks_and_workers(
    corpus, tmp_path, world, workers
):
    out = tmp_path / "keys.json"
    mp.start_processes(
        _epoch_on_rank,
        (world, free_port(), corpus, workers, str(out)),
        nprocs=world,
        start_method="spawn",
    )
    per_rank = json.loads(out.read_text())
    everything = [k for keys in per_rank for k in keys]
    assert all(per_rank), "every rank got data"
    assert Counter(everything).most_common(1)[0][1] == 1, "no sample twice"
    assert set(everything) == corpus.keys()


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_epoch_is_the_corpus(corpus, workers):
    keys = _keys(pipeline(corpus.config(num_workers=workers), 0, 1, 5, mode="epoch"))
    assert sorted(keys) == sorted(corpus.keys())


# ------------------------------------------------------------------------------ training order


def test_training_is_infinite_deterministic_and_seeded(corpus):
    cfg = corpus.config(num_workers=2)
    first = _keys(pipeline(cfg, 0, 1, 4), 60)  # 240 samples: several passes over 51
    assert first == _keys(pipeline(cfg, 0, 1, 4), 60)
    assert first != _keys(pipeline(corpus.config(seed=8, num_workers=2), 0, 1, 4), 60)
    served = Counter(first)
    assert served.keys() == corpus.keys(), "a long run reaches every sample"
    assert max(served.values()) > 1, "and goes on past the first pass"


def test_shard_order_differs_between_epochs(corpus):
    (alpha, *_) = resolve_sources(corpus.config().data)
    stream = SourceStream(alpha, WorkerLayout(0, 1, 0, 1), 7, "train", 1, Health())
    epochs = [[stream._shard_at(e * 5 + i) for i in range(5)] for e in range(4)]
    assert all(sorted(e) == sorted(alpha.urls) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_sources_are_drawn_by_weight(corpus):
    weights = {"alpha": 1.0, "beta": 3.0, "gamma": 0.0, "epsilon": 0.0, "delta": 1.0}
    cfg = corpus.config(corpus.sources(**weights), num_workers=0)
    counts = Counter(k.split("-")[0] for k in _keys(pipeline(cfg, 0, 1, 8), 100))
    assert "gamma" not in counts
    assert counts["beta"] / 800 == pytest.approx(0.6, abs=0.05)


def test_batches_hold_what_the_task_formats(corpus):
    """An image-only mixture: images [B, 3, S, S] and no frame mask (video: test_video.py)."""
    tokenizer = Tokenizer.load(corpus.tokenizer)
    batch = next(iter(pipeline(corpus.config(corpus.sources(video=False), num_workers=0), 0, 1, 6)))
    assert batch.images.shape == (6, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.frame_mask is None
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    for key, prompt, target in zip(
        batch.keys, tokenizer.batch_decode(batch.prompt), tokenizer.batch_decode(batch.target)
    ):
        source, index = key.split("-")
        if source == "delta":  # img2dataset: the .txt caption, in the source's first language
            colour = list(COLOURS)[int(index) % len(COLOURS)]
            assert (prompt, target) == ("Caption in EN:", f"a {colour} square number {int(index)}")
        elif source == "alpha":
            assert prompt in ("Caption in EN:", "Caption in DE:")
            assert target in (f"ein Quadrat {int(index)}",) or target.endswith(f"{int(index)}")
        elif source == "beta":
            assert prompt.startswith("Answer in EN:")
        else:
            assert f"{prompt.split(': ', 1)[-1]} {target}".strip().endswith(f"of {source}")
    assert batch.prompt_mask.sum(1).tolist() == [
        len(tokenizer.encode(p)) for p in tokenizer.batch_decode(batch.prompt)
    ]


def _encoded_images(corpus) -> dict[str, bytes]:
    """Every sample's image bytes as the shards hold them, read without the pipeline."""
    images = {}
    for shard in corpus.root.rglob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                if field in ("png", "webp"):
                    images[key] = tar.extractfile(member).read()
    return images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_are_the_decoded_samples_normalised(corpus, dtype):
    """Workers hand over uint8; the batch the model gets is each key's own image in [-1, 1]."""
    cfg = corpus.config(corpus.sources(video=False), num_workers=2)
    batch = next(iter(pipeline(cfg, 0, 1, 8, image_dtype=dtype)))
    encoded = _encoded_images(corpus)
    size = cfg.model.vit.image_size_px
    expected = torch.stack([decode_image(encoded[key], size) for key in batch.keys])
    assert batch.images.dtype == dtype
    assert torch.equal(batch.images, normalize_images(expected, dtype))


# --------------------------------------------------------------------------------- exact resume


def _tensors(batch):
    # The corpus has a video source: images are clips, with their frame masks.
    return [batch.images, batch.frame_mask, batch.prompt, batch.prompt_mask, batch.target,
            batch.target_mask]  # fmt: skip


@pytest.mark.parametrize("workers,mode", [(2, "train"), (0, "train"), (2, "epoch")])
def test_resume_continues_exactly_where_the_run_stopped(corpus, workers, mode):
    cfg = corpus.config(num_workers=workers)
    stop, more = 5, 6
    reference = list(islice(pipeline(cfg, 1, 2, 3, mode=mode), stop + more))

    first = pipeline(cfg, 1, 2, 3, mode=mode)
    seen = list(islice(first, stop))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = pipeline(cfg, 1, 2, 3, mode=mode)
    resumed.load_state_dict(state)
    after = list(resumed)[:more] if mode == "epoch" else list(islice(resumed, more))

    assert [b.keys for b in seen + after] == [b.keys for b in reference]
    for got, want in zip(after, reference[stop:]):
        for a, b in zip(_tensors(got), _tensors(want)):
            assert torch.equal(a, b)


def test_stats_count_what_was_served_across_workers(corpus):
    data = pipeline(corpus.config(num_workers=2), 0, 1, 4, mode="epoch")
    keys = _keys(data)
    stats = data.stats()
    assert stats.served == dict(Counter(k.split("-")[0] for k in keys))
    assert stats.skipped == {}


def test_resuming_with_another_worker_count_is_refused(corpus):
    first = pipeline(corpus.config(num_workers=2), 0, 1, 4)
    list(islice(first, 3))
    other = pipeline(corpus.config(num_workers=1), 0, 1, 4)
    with pytest.raises(Exception, match="saved with 1 data-parallel ranks x 2 workers"):
        other.load_state_dict(first.state_dict())
        next(iter(other))


# ------------------------------------------------------------------------------ refused config


def test_pipe_urls_read_like_local_files(corpus):
    sources = corpus.sources()
    for s in sources:
        s["shards"] = "pipe:cat " + s["shards"]
    piped = _keys(pipeline(corpus.config(sources, num_workers=0), 0, 1, 5, mode="epoch"))
    local = _keys(pipeline(corpus.config(num_workers=0), 0, 1, 5, mode="epoch"))
    assert piped == local


@pytest.mark.parametrize(
    "change,field,words",
    [
        ({"shards": "/nowhere/x-{000..003}.tar"}, "data.sources[1].shards", "matches no file"),
        ({"prompt": "Answer: {answer}"}, "data.sources[1].prompt", "unknown placeholder {answer}"),
    ],
)
def test_a_bad_source_is_refused_naming_the_field(corpus, change, field, words):
    sources = corpus.sources()
    sources[1].update(change)
    with pytest.raises(ConfigError) as info:
        pipeline(corpus.config(sources), 0, 1, 4)
    assert info.value.field_path == field and words in str(info.value)


def test_a_folder_stands_for_its_manifests_shards_or_its_tar_files(corpus, tmp_path):
    """alpha's folder has write_shards' manifest.json; delta's (img2dataset) has none."""
    expected = [
        u for s in corpus.sources() for u in resolve_sources(corpus.config([s]).data)[0].urls
    ]
    folders = [{**s, "shards": str(corpus.root / s["name"])} for s in corpus.sources()]
    resolved = resolve_sources(corpus.config(folders).data)
    assert [u for r in resolved for u in r.urls] == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data.sources\[0\].shards: .*holds no .tar"):
        resolve_sources(corpus.config([{**folders[0], "shards": str(tmp_path / "empty")}]).data)


def test_partly_missing_shards_are_named(corpus):
    sources = corpus.sources()
    sources[0]["shards"] = sources[0]["shards"].replace("000004}", "000009}")
    with pytest.raises(ConfigError, match=r"has missing shards: .*alpha-000005.tar"):
        pipeline(corpus.config(sources), 0, 1, 4)


def test_a_mixture_without_tokenizer_is_refused(corpus):
    with pytest.raises(ConfigError, match="data.tokenizer_path"):
        pipeline(corpus.config(tokenizer_path=None), 0, 1, 4)
