"""Video samples: the frames a clip takes (against hand-worked indices), decoding mp4, webm and
JPEG frame lists back to the frames that were encoded, clips in batches, corrupt videos skipped
and counted, and what the shard writer records of each video."""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pali3_train.config.schema import SourceConfig
from pali3_train.data_pipeline.formats import Rejected, prepare_sample
from pali3_train.data_pipeline.manifest import Manifest
from pali3_train.data_pipeline.transforms import normalize_images
from pali3_train.data_pipeline.video import (
    FrameStride,
    UndecodableVideo,
    encode_video,
    frame_indices,
    sample_clip,
    timed_frame_indices,
    video_info,
)
from pali3_train.data_pipeline.write_shards import Example, main, write_source
from tests.data_pipeline.corpus import MAX_FRAMES, pipeline, video_example, video_frames

SECONDS, FRAMES = FrameStride(seconds=0.5), FrameStride(frames=10)

# ------------------------------------------------------------------------------ frame indices


@pytest.mark.parametrize(
    "count,fps,stride,max_frames,offset,expected",
    [
        # 4 s at 25 fps, every 12.5 frames: 8 fit in 99 frames, 11.5 to spare, centred at 5.75
        (100, 25.0, SECONDS, 16, None, [5, 18, 30, 43, 55, 68, 80, 93]),
        # training: whole starts 0..11 (12 of them); 0.999 * 12 = 11.988: start 11, then
        # 23.5, 36, 48.5, 61, 73.5, 86, 98.5 rounded down
        (100, 25.0, SECONDS, 16, 0.0, [0, 12, 25, 37, 50, 62, 75, 87]),
        (100, 25.0, SECONDS, 16, 0.999, [11, 23, 36, 48, 61, 73, 86, 98]),
        # 10 s at 30 fps, every 10 frames: 16 of 30 taken, 149 to spare, centred at 74.5
        (300, 30.0, FRAMES, 16, None, list(range(74, 225, 10))),
        # training: 150 whole starts 0..149, start floor(150 u)
        (300, 30.0, FRAMES, 16, 0.0, list(range(0, 151, 10))),
        (300, 30.0, FRAMES, 16, 0.5, list(range(75, 226, 10))),  # 75
        (300, 30.0, FRAMES, 16, 0.999, list(range(149, 300, 10))),  # 149.85: the last window
        (300, 30.0, FRAMES, 4, None, [134, 144, 154, 164]),  # 4 of 30: 269 to spare
        # one frame to spare: starts 0 and 1, each half the draws
        (17, 25.0, FrameStride(frames=1), 16, 0.49, list(range(0, 16))),
        (17, 25.0, FrameStride(frames=1), 16, 0.5, list(range(1, 17))),
        (8, 8.0, FrameStride(frames=2), 4, 0.49, [0, 2, 4, 6]),  # the demo's clips
        (8, 8.0, FrameStride(frames=2), 4, 0.5, [1, 3, 5, 7]),
        # shorter than max_frames: every frame that fits, the rest is padding
        (5, 25.0, FrameStride(frames=1), 16, None, [0, 1, 2, 3, 4]),
        (7, 10.0, FrameStride(frames=2), 16, 0.7, [0, 2, 4, 6]),  # no room to move
        # a stride longer than the video: one frame, centred (4.5) or drawn (floor(0.99 * 10))
        (10, 10.0, FrameStride(seconds=2.0), 16, None, [4]),
        (10, 10.0, FrameStride(seconds=2.0), 16, 0.99, [9]),
        (10, 1e300, FrameStride(seconds=1e300), 16, None, [4]),  # its length in frames is inf
        # 0.1 s at 30 fps is 3.0000000000000004 frames: still 4 frames in 10
        (10, 30.0, FrameStride(seconds=0.1), 16, None, [0, 3, 6, 9]),
        (10, 30.0, FrameStride(seconds=0.1), 16, 0.999, [0, 3, 6, 9]),
        # a stride under one frame takes consecutive frames, never one twice
        (5, 25.0, FrameStride(seconds=0.01), 3, None, [1, 2, 3]),
        (1, 25.0, SECONDS, 16, None, [0]),
    ],
)
def test_frame_indices_match_hand_worked_values(count, fps, stride, max_frames, offset, expected):
    assert frame_indices(count, fps, stride, max_frames, offset) == expected


@pytest.mark.parametrize(
    "count,stride,max_frames,starts",
    [(20, 3, 4, 11), (17, 1, 16, 2), (8, 2, 4, 2), (9, 2, 4, 3), (10, 2, 4, 4), (300, 10, 16, 150)],
)
def test_every_training_start_is_equally_likely(count, stride, max_frames, starts):
    """Offsets spread evenly over [0, 1) start the clip at each whole frame 0 .. slack equally
    often: 20 frames, every 3rd, 4 taken span 9 and leave 10 to spare, so 11 starts; 17 frames,
    16 consecutive: 2; 8 frames, every 2nd, 4 taken: 2 (the demo's clips); 9: 3; 10: 4."""
    draws = 10 * starts
    first = [
        frame_indices(count, None, FrameStride(frames=stride), max_frames, (i + 0.5) / draws)[0]
        for i in range(draws)
    ]
    assert sorted(Counter(first).items()) == [(s, 10) for s in range(starts)]


def test_a_stride_in_seconds_needs_a_frame_rate():
    with pytest.raises(UndecodableVideo, match="needs the video's frame rate"):
        frame_indices(10, None, SECONDS, 4, None)
    assert frame_indices(10, None, FrameStride(frames=3), 4, None) == [0, 3, 6, 9]


@pytest.mark.parametrize(
    "options",
    [{}, {"seconds": 1.0, "frames": 2}, {"frames": 0}, {"seconds": math.inf},
     {"seconds": math.nan}, {"seconds": -0.5}],
)  # fmt: skip
def test_a_stride_is_seconds_or_frames_finite_and_positive(options):
    with pytest.raises(ValueError, match="frame stride"):
        FrameStride(**options)


# a variable-frame-rate video: bursts of frames 0.1 s and 0.05 s apart, pauses of up to 0.9 s
VFR_TIMES = [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 2.0, 2.05, 2.1, 3.0]


@pytest.mark.parametrize(
    "times,seconds,max_frames,offset,expected",
    [
        # 3 s, every 1 s: 4 fit, no slack; the frames shown at 0, 1, 2 and 3 s
        (VFR_TIMES, 1.0, 16, None, [0, 4, 7, 10]),
        # every 0.9 s: 4 fit in 3 s, 0.3 s to spare, centred at 0.15: times 0.15, 1.05, 1.95,
        # 2.85, each the last frame shown by then: 0.1, 1.0, 1.2, 2.1
        (VFR_TIMES, 0.9, 16, None, [1, 4, 6, 9]),
        # training: frames 0-3 are shown within the 0.3 s, 4 starts, floor(4 u)
        (VFR_TIMES, 0.9, 16, 0.0, [0, 3, 6, 9]),  # 0, 0.9, 1.8, 2.7
        (VFR_TIMES, 0.9, 16, 0.99, [3, 6, 9, 10]),  # from 0.3 s: 0.3, 1.2, 2.1, 3.0
        # every 0.5 s: 7 fit; at 0.5, 1.5 and 2.5 s the frames of 0.3, 1.2 and 2.1 s show
        (VFR_TIMES, 0.5, 16, None, [0, 3, 4, 6, 7, 9, 10]),
        # a frame held 2 s: every 1.05 s (the mean gap, longer than the stride) takes it twice
        ([0.0, 2.0, 2.1], 0.5, 16, None, [0, 0, 2]),
        # a constant 25 fps: frame_indices' hand-worked clips, centred and from start 11
        ([i / 25 for i in range(100)], 0.5, 16, None, [5, 18, 30, 43, 55, 68, 80, 93]),
        ([i / 25 for i in range(100)], 0.5, 16, 0.999, [11, 23, 36, 48, 61, 73, 86, 98]),
        ([5.0], 0.5, 16, 0.3, [0]),
    ],
)
def test_timed_frame_indices_match_hand_worked_values(times, seconds, max_frames, offset, expected):
    assert timed_frame_indices(times, seconds, max_frames, offset) == expected


# ----------------------------------------------------------------------------------- decoding


def _smooth_frames(count: int = 6, size: int = 32) -> np.ndarray:
    """uint8 [T, S, S, 3]: smooth gradients (what lossy codecs keep) that differ per frame."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    frames = [
        np.stack([40 + 150 * x, 40 + 150 * y, np.full_like(x, 30 + 35 * t)], axis=-1)
        for t in range(count)
    ]
    return np.round(np.stack(frames)).astype(np.uint8)


def _jpegs(frames: np.ndarray) -> list[bytes]:
    out = []
    for pixels in frames:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


@pytest.mark.parametrize("kind", ["mp4", "webm", "jpeg frames"])
def test_videos_decode_to_the_frames_encoded_padded_and_masked(kind):
    frames = _smooth_frames()
    encoded = _jpegs(frames) if kind == "jpeg frames" else encode_video(frames, 12.0, kind)
    clip, mask = sample_clip(encoded, 32, 8, FrameStride(frames=1), None, fps=12.0)
    assert clip.shape == (8, 3, 32, 32) and clip.dtype == torch.uint8
    assert mask.tolist() == [True] * 6 + [False] * 2
    assert not clip[6:].any(), "padding is zeros, never a repeated frame"
    decoded = clip[:6].permute(0, 2, 3, 1).float()
    original = torch.from_numpy(frames).float()
    error = (decoded - original).abs().mean(dim=(1, 2, 3))
    assert error.max() < 3, error  # H.264/VP8/JPEG at high quality on smooth frames
    nearest = torch.cdist(decoded.flatten(1), original.flatten(1)).argmin(1)
    assert nearest.tolist() == list(range(6)), "each frame in its place"


def test_a_training_clip_starts_where_the_generator_says():
    """20 PNG frames of brightness 10 t, every 3rd, 4 of them: 10 frames to spare, so the clip
    starts at frame floor(11 u), 0 to 10, for the generator's next uniform u."""
    frames = [_png(np.full((8, 8, 3), 10 * t, np.uint8)) for t in range(20)]
    starts = set()
    for seed in range(40):
        clip, _ = sample_clip(frames, 8, 4, FrameStride(frames=3), np.random.default_rng(seed))
        start = math.floor(11 * np.random.default_rng(seed).random())
        assert clip[:, 0, 0, 0].tolist() == [10 * (start + 3 * k) for k in range(4)]
        starts.add(start)
    assert {0, 10} <= starts, "the first and the last windows are both drawn"
    centred, _ = sample_clip(frames, 8, 4, FrameStride(frames=3), None)
    assert centred[:, 0, 0, 0].tolist() == [50, 80, 110, 140]  # frames 5, 8, 11, 14


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "encoded,words",
    [
        (b"\x00\x00\x00\x18ftypmp42 not a video", "InvalidDataError"),
        ([_png(np.zeros((4, 4, 3), np.uint8)), b"not a frame"], "frame 1: "),
    ],
)
def test_an_undecodable_video_says_why(encoded, words):
    with pytest.raises(UndecodableVideo, match=words):
        sample_clip(encoded, 8, 4, FrameStride(frames=1), None)


def _faststart_mp4(count: int) -> bytes:
    """``count`` frames of brightness 20 t as an H.264 mp4 with its index first (as streamed
    downloads are), so a cut file still opens; no B-frames, so frames decode in order."""
    with tempfile.TemporaryDirectory() as folder:  # faststart rewrites the file: no BytesIO
        path = Path(folder) / "clip.mp4"
        with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
            options = {"crf": "12", "x264-params": "asm=0", "bf": "0"}
            stream = out.add_stream("libx264", rate=10, options=options)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            stream.codec_context.thread_count = 1
            for t in range(count):
                pixels = np.full((16, 16, 3), 20 * t, np.uint8)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            out.mux(stream.encode())
        return path.read_bytes()


def _cut_in_frame(data: bytes, frame: int) -> bytes:
    """``data`` cut halfway through frame ``frame``'s packet, as a broken download is: that
    packet still demuxes (short), and it and what follows do not decode."""
    with av.open(io.BytesIO(data)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
        return data[: packets[frame].pos + packets[frame].size // 2]


def test_a_video_whose_end_does_not_decode_is_read_as_the_frames_that_do():
    """12 frames cut inside frame 8: 9 packets demux, frames 0-7 decode. Every draw, and the
    centred clip, is served from those 8 frames, whether or not it reaches the break."""
    cut = _cut_in_frame(_faststart_mp4(12), 8)
    draws = [np.random.default_rng(seed) for seed in range(12)]
    # every frame, 1 apart, into 16 slots: the 8 that decode, the same clip for every draw
    for rng in [*draws, None]:
        clip, mask = sample_clip(cut, 16, 16, FrameStride(frames=1), rng)
        assert mask.tolist() == [True] * 8 + [False] * 8
        assert (clip[:8, 0, 0, 0].float() - torch.arange(0, 160, 20)).abs().max() < 4
    # every 2nd frame into 4 slots: over 9 frames the starts 0, 1, 2 (u < 1/3, < 2/3, the rest);
    # start 2 reaches frame 8, so the clip is drawn again over the 8 frames that decode with the
    # same u: start floor(2 u) = 1. So start 0 for u < 1/3, else 1; never a skip.
    late = 0
    for seed in range(12):
        u = np.random.default_rng(seed).random()
        clip, mask = sample_clip(cut, 16, 4, FrameStride(frames=2), np.random.default_rng(seed))
        start = 0 if u < 1 / 3 else 1
        expected = torch.tensor([20.0 * (start + 2 * k) for k in range(4)])
        assert mask.all() and (clip[:, 0, 0, 0].float() - expected).abs().max() < 4, (seed, u)
        late += u >= 2 / 3
    assert late, "some draw reached the break"
    with pytest.raises(UndecodableVideo):  # the writer refuses it whole
        video_info(cut)


def _vfr_mp4(times: list[float]) -> bytes:
    """An H.264 mp4 of frames shown at ``times`` (their timestamps set by hand, in ms), frame i
    of brightness 20 i."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        options = {"crf": "12", "x264-params": "asm=0", "bf": "0"}
        stream = out.add_stream("libx264", rate=10, options=options)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 20 * i, np.uint8), "rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def test_a_variable_frame_rate_video_is_sampled_by_its_timestamps():
    """VFR_TIMES as an mp4 (11 frames over 3 s: an average rate of about 3.5 fps, by which every
    1 s would be frames 1, 5 and 8 centred): every 1 s takes the frames shown at 0, 1, 2 and 3 s,
    and every 0.9 s those of test_timed_frame_indices_match_hand_worked_values."""
    mp4 = _vfr_mp4(VFR_TIMES)
    for seconds, rng, frames in [
        (1.0, None, [0, 4, 7, 10]),
        (0.9, None, [1, 4, 6, 9]),
        *[(0.9, seed, None) for seed in range(6)],
    ]:
        draw = None if rng is None else np.random.default_rng(rng)
        clip, mask = sample_clip(mp4, 16, 8, FrameStride(seconds=seconds), draw)
        if frames is None:  # training: from frame j = floor(4 u) at 0, 0.1, 0.2 or 0.3 s
            j = math.floor(4 * np.random.default_rng(rng).random())
            frames = [[0, 3, 6, 9], [1, 4, 6, 9], [2, 5, 7, 9], [3, 6, 9, 10]][j]
        assert mask.tolist() == [True] * 4 + [False] * 4
        expected = torch.tensor([20.0 * i for i in frames])
        assert (clip[:4, 0, 0, 0].float() - expected).abs().max() < 4, (seconds, rng, frames)
    # a frame held 2 s, every 0.5 s: every 1.05 s (the mean gap), the held frame twice
    clip, mask = sample_clip(_vfr_mp4([0.0, 2.0, 2.1]), 16, 4, FrameStride(seconds=0.5), None)
    assert mask.tolist() == [True, True, True, False]
    assert (clip[:3, 0, 0, 0].float() - torch.tensor([0.0, 0.0, 40.0])).abs().max() < 4


def test_a_video_with_no_frame_that_decodes_is_refused():
    cut = _cut_in_frame(_faststart_mp4(4), 0)
    with pytest.raises(UndecodableVideo, match="0 of them decode"):
        sample_clip(cut, 16, 4, FrameStride(frames=1), np.random.default_rng(0))


def test_frames_over_pils_pixel_limit_are_refused_before_decoding(monkeypatch):
    """Images have PIL's decompression-bomb limit; videos get the same: 16 x 16 = 256 pixels."""
    mp4 = encode_video(_smooth_frames(count=2, size=16), 10.0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)
    clip, _ = sample_clip(mp4, 16, 2, FrameStride(frames=1), None)
    assert clip.shape == (2, 3, 16, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 255)
    for read in (
        lambda: sample_clip(mp4, 16, 2, FrameStride(frames=1), None),
        lambda: video_info(mp4),
    ):
        with pytest.raises(
            UndecodableVideo, match=r"16x16 frames: over PIL.Image.MAX_IMAGE_PIXELS \(255"
        ):
            read()
    spec = SourceConfig(name="clips", shards="x.tar", task="video_caption", frame_stride_frames=1)
    raw = {"__key__": "big", "mp4": mp4, "json": json.dumps({"caption": {"en": "a"}}).encode()}
    with pytest.raises(Rejected, match="corrupt_video: 16x16 frames"):
        prepare_sample(spec, raw, np.random.default_rng(0), 16, max_frames=2)


@pytest.mark.parametrize("fps", [b"inf", b"-inf", b"nan", b"0", b"fast"])
def test_a_frame_list_whose_rate_is_not_a_finite_rate_is_a_corrupt_video(fps):
    """Refused as ``Rejected`` (counted and skipped), never a ValueError that ends the worker."""
    spec = SourceConfig(name="clips", shards="x.tar", task="video_caption", frame_stride_s=0.5)
    frames = {f"frame{i:04d}.jpg": jpeg for i, jpeg in enumerate(_jpegs(_smooth_frames(3, 8)))}
    record = json.dumps({"caption": {"en": "a clip"}}).encode()
    raw = {"__key__": "v", "json": record, "fps": fps, **frames}
    with pytest.raises(Rejected, match=r"corrupt_video: \.fps is"):
        prepare_sample(spec, raw, np.random.default_rng(0), 8, max_frames=4)


@pytest.mark.parametrize("fps", [math.inf, math.nan, 0.0])
def test_a_frame_list_given_a_rate_that_makes_no_clip_is_undecodable(fps):
    frames = _jpegs(_smooth_frames(3, 8))
    with pytest.raises(UndecodableVideo):
        sample_clip(frames, 8, 4, SECONDS, np.random.default_rng(0), fps=fps)


# ------------------------------------------------------------------------------------ batches


# corpus video i has FRAME_COUNTS[i] frames, read every 2nd frame into 4 slots: the centred
# indices (slack 1 centres at 0.5, slack 2 at 1, slack 3 at 1.5; all round down)
CENTRED = {2: [0], 3: [0, 2], 4: [0, 2], 5: [0, 2, 4], 6: [0, 2, 4], 9: [1, 3, 5, 7],
           10: [1, 3, 5, 7]}  # fmt: skip


def test_a_mixture_with_video_batches_clips_and_images_as_one_frame_clips(corpus):
    """Evaluation pass (centred clips): each video's clip is its frames at the hand-worked
    indices; each image is frame 0 of an otherwise masked clip."""
    batches = list(pipeline(corpus.config(num_workers=0), 0, 1, 8, mode="epoch"))
    videos = 0
    for batch in batches:
        assert batch.images.shape[1:] == (MAX_FRAMES, 3, 16, 16)
        assert batch.frame_mask.shape == (len(batch), MAX_FRAMES)
        for key, clip, mask in zip(batch.keys, batch.images, batch.frame_mask):
            source, index = key.split("-")
            if source != "epsilon":
                assert mask.tolist() == [True, False, False, False]
                assert clip[1:].eq(-1).all(), "padding frames are black"
                continue
            videos += 1
            frames = video_frames(int(index))
            wanted = CENTRED[len(frames)]
            assert mask.tolist() == [k < len(wanted) for k in range(MAX_FRAMES)]
            expected = normalize_images(torch.from_numpy(frames[wanted]).permute(0, 3, 1, 2))
            assert (clip[: len(wanted)] - expected).abs().mean() < 0.06, key
    assert videos == 7


# ---------------------------------------------------------------------- corrupt videos, writer


def _raw(example: Example) -> dict:
    """A sample as write_source lays it out, written here without its decode check."""
    media = (
        {example.image_format: example.image}
        if isinstance(example.image, bytes)
        else {f"frame{i:04d}.jpg": f for i, f in enumerate(example.image)} | {"fps": b"5.0"}
    )
    return {"__key__": example.key, **media, "json": json.dumps(example.record).encode()}


def test_a_corrupt_video_is_skipped_and_counted(corpus, tmp_path):
    samples = [_raw(video_example("clips", i)) for i in range(6)]
    samples[2]["mp4"] = samples[2]["mp4"][: len(samples[2]["mp4"]) // 3]  # a cut mp4
    samples[3]["frame0001.jpg"] = b"\xff\xd8 not a JPEG"  # a broken frame
    samples[5]["fps"] = b"inf"  # a rate that makes no clip: skipped, the worker goes on
    with wds.TarWriter(str(tmp_path / "clips-0.tar")) as tar:
        for sample in samples:
            tar.write(sample)
    source = {"name": "clips", "shards": str(tmp_path / "clips-0.tar"),
              "task": "video_caption", "frame_stride_frames": 1}  # fmt: skip
    cfg = corpus.config([source], num_workers=0, max_skip_fraction=0.5)
    data = pipeline(cfg, 0, 1, 4, mode="epoch")
    keys = [k for batch in data for k in batch.keys]
    assert keys == [f"clips-{i:05d}" for i in (0, 1, 4)]
    assert data.stats().skipped == {"clips/corrupt_video": 3}


def test_the_writer_records_each_videos_frames_rate_and_duration(tmp_path):
    frames = _smooth_frames(count=7, size=16)
    record = {"caption": {"en": "a clip"}}
    examples = [
        Example("mp4", encode_video(frames, 10.0), "mp4", record),
        Example("webm", encode_video(frames[:4], 8.0, "webm"), "webm", record),
        Example("jpegs", tuple(_jpegs(frames[:5])), "jpg", record, fps=2.5),
        Example("cut", encode_video(frames, 10.0)[:200], "mp4", record),
    ]
    manifest = write_source(examples, tmp_path, "clips", ["video_caption"], ["en"])
    assert manifest.videos == {
        "mp4": {"frames": 7, "fps": 10.0, "duration_s": 0.7},
        "webm": {"frames": 4, "fps": 8.0, "duration_s": 0.5},
        "jpegs": {"frames": 5, "fps": 2.5, "duration_s": 2.0},
    }
    assert manifest.skipped == {"corrupt_video": 1} and manifest.samples == 3
    assert Manifest.read(tmp_path) == manifest
    members = [sorted(s) for s in wds.WebDataset(str(tmp_path / manifest.pattern),
                                                 shardshuffle=False)]  # fmt: skip
    assert members[2] == ["__key__", "__local_path__", "__url__", "fps",
                          *[f"frame{i:04d}.jpg" for i in range(5)], "json"]  # fmt: skip


def test_the_command_line_writes_videos_and_frame_lists(tmp_path, capsys):
    folder = tmp_path / "clips"
    (folder / "a").mkdir(parents=True)
    frames = _smooth_frames(count=3, size=16)
    (folder / "a" / "walk.mp4").write_bytes(encode_video(frames, 25.0))
    for i, jpeg in enumerate(_jpegs(frames)):
        (folder / f"f{i}.jpg").write_bytes(jpeg)
    lines = [
        {"video": "a/walk.mp4", "captions": ["someone walks", "a walk"]},
        {"frames": ["f0.jpg", "f1.jpg", "f2.jpg"], "fps": 1.5, "key": "still",
         "question": "how many frames?", "answer": "three"},
    ]  # fmt: skip
    records = tmp_path / "clips.jsonl"
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "shards"
    main(["--images", str(folder), "--records", str(records), "--out", str(out),
          "--name", "clips", "--tasks", "video_caption,video_qa"])  # fmt: skip
    assert "wrote 2 samples" in capsys.readouterr().out
    assert Manifest.read(out).videos == {
        "a_walk_mp4": {"frames": 3, "fps": 25.0, "duration_s": 0.12},
        "still": {"frames": 3, "fps": 1.5, "duration_s": 2.0},
    }


@pytest.mark.parametrize(
    "line,words",
    [
        ({"video": "a.gif"}, r"clips.jsonl:1: .*a.gif: only .mp4 and .webm videos"),
        ({"frames": ["f0.jpg"]}, "clips.jsonl:1: fps: frames need their frame rate"),
        ({"frames": "f0.jpg", "fps": 2}, "clips.jsonl:1: frames: expected a list"),
        ({"frames": ["x.webp"], "fps": 2}, r"clips.jsonl:1: frames: .*only .jpg, .jpeg and .png"),
        (
            {"frames": ["f0.jpg"], "fps": math.inf},
            r"clips.jsonl:1: fps: .*\(a finite number > 0\), got inf",
        ),
        (
            {"frames": ["f0.jpg"], "fps": math.nan},
            r"clips.jsonl:1: fps: .*\(a finite number > 0\), got nan",
        ),
    ],
)
def test_bad_video_records_are_refused_naming_file_line_and_field(tmp_path, line, words):
    records = tmp_path / "clips.jsonl"
    records.write_text(json.dumps(line) + "\n")
    with pytest.raises(SystemExit, match=words):
        main(["--images", str(tmp_path), "--records", str(records), "--out", str(tmp_path / "o"),
              "--name", "clips", "--tasks", "video_caption"])  # fmt: skip


@pytest.mark.parametrize(
    "frames,image_format,fps,words",
    [
        ("webp", "webp", 2.0, "sample 'w': image_format: frames must be jpg, jpeg, png files, "
         "got 'webp'"),
        ("jpg", "jpg", math.inf, "sample 'w': fps: expected a finite rate > 0, got inf"),
        ("jpg", "jpg", math.nan, "sample 'w': fps: expected a finite rate > 0, got nan"),
    ],
)  # fmt: skip
def test_the_writer_refuses_frame_lists_the_reader_cannot_read(tmp_path, frames, image_format,
                                                               fps, words):  # fmt: skip
    """WebP frames (the reader reads JPEG and PNG frames only) and a rate that is not finite
    (Python's json reads ``Infinity``; the manifest would not be JSON) stop the writer."""
    encoded = []
    for pixels in _smooth_frames(2, 8):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="WEBP" if frames == "webp" else "JPEG")
        encoded.append(buffer.getvalue())
    example = Example("w", tuple(encoded), image_format, {"caption": {"en": "a"}}, fps=fps)
    with pytest.raises(ValueError, match=re.escape(words)):
        write_source([example], tmp_path, "clips", ["video_caption"], ["en"])
    assert not (tmp_path / "manifest.json").exists()
