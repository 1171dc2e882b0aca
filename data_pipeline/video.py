"""Video samples: which frames a clip takes, and decoding just those.

PaLI-3 reads a video as at most 16 frames a fixed time apart, each through the ViT on its own.
A clip here is that: ``max_frames`` slots, filled in time order with frames ``stride`` apart, the
real ones first and the rest zeros with a ``False`` in the frame mask. A short video is padded,
never looped or stretched, so the model never sees a frame twice as if it were new motion (a
variable-rate video's frame held on screen past the stride fills each slot whose time it was
shown at: that is what the video showed).

Where the clip starts. The span of frames the clip covers usually fits the video with room to
spare (its *slack*); training starts it at a whole frame of that slack, every start equally
likely, drawn from the worker's generator (whose state a checkpoint keeps, so a resumed run
draws the same clips), and evaluation centres it. ``frame_indices`` is that arithmetic alone, so
it can be checked by hand.

A video arrives either encoded (mp4, webm: decoded with PyAV, which bundles its own FFmpeg) or as
a list of encoded frames (JPEG/PNG, extracted beforehand at a known frame rate). An encoded
video read with a stride in seconds is sampled by its frames' timestamps
(``timed_frame_indices``), so a variable-frame-rate video's clip is still a fixed time apart; at
a constant rate that is the clip ``frame_indices`` gives. Only the chosen frames are converted
and resized, with the same resize as images (``transforms.resize_square``).
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import av
import numpy as np
import torch
from PIL import Image

from pali3_train.data_pipeline.transforms import decode_image, resize_square

VIDEO_FIELDS = ("mp4", "webm")
# Float slack when a stride in seconds times a frame rate lands on a whole frame (0.1 s x 30 fps).
_EPS = 1e-6

Encoded = bytes | Sequence[bytes]  # an mp4/webm file, or its frames as JPEG/PNG files


class UndecodableVideo(ValueError):
    """The video (or one of its frames) cannot be decoded, or holds no frame."""


@dataclass(frozen=True)
class FrameStride:
    """The fixed time between sampled frames: ``seconds`` (needs an encoded video's timestamps
    or the video's frame rate) or ``frames``; exactly one."""

    seconds: float | None = None
    frames: int | None = None

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.frames is None):
            raise ValueError("a frame stride is given in seconds or in frames, exactly one")
        value = self.seconds if self.frames is None else self.frames
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"a frame stride must be finite and > 0, got {value}")

    def in_frames(self, fps: float | None) -> float:
        if self.frames is not None:
            return float(self.frames)
        if not fps:
            raise UndecodableVideo(
                f"a stride of {self.seconds} s needs the video's frame rate, which it lacks"
            )
        if not (math.isfinite(fps) and fps > 0):
            raise UndecodableVideo(f"a frame rate of {fps} is not finite and > 0")
        return self.seconds * fps


@dataclass(frozen=True)
class VideoInfo:
    """What the shard writer's manifest records of a video."""

    frames: int
    fps: float | None  # None: a frame list given without its rate

    @property
    def duration_s(self) -> float | None:
        return self.frames / self.fps if self.fps else None


def frame_indices(
    frame_count: int, fps: float | None, stride: FrameStride, max_frames: int, offset: float | None
) -> list[int]:
    """The frames a clip takes, in time order. With ``step`` the stride in frames (at least 1:
    a stride under one frame takes consecutive frames, never the same frame twice), the clip
    takes ``taken = min(max_frames, floor((frame_count - 1) / step) + 1)`` frames, and its frame
    k is ``floor(start + k * step)``. The room its span leaves in the video is
    ``slack = (frame_count - 1) - (taken - 1) * step``, and ``start`` is in [0, slack]:

    - training (``offset`` a uniform draw in [0, 1)): a whole frame, each of the
      ``floor(slack) + 1`` starts 0, 1, ..., floor(slack) equally likely:
      ``start = floor(offset * (floor(slack) + 1))``, so the last window is drawn as often as
      the first. A step that is not a whole number of frames (12.5) rounds every training clip
      alike: the clip starting at frame s is the one starting at 0 moved s frames on;
    - evaluation (``offset`` None): centred, ``start = slack / 2``, which may fall between
      frames.

    A stride longer than the video takes one frame (any frame in training, the middle one in
    evaluation)."""
    if frame_count < 1:
        raise UndecodableVideo("the video holds no frame")
    # Capped at the video's length, which takes one frame all the same: the slack stays finite
    # however long the stride (a huge one times a frame rate can overflow to inf).
    step = min(max(1.0, stride.in_frames(fps)), float(frame_count))
    taken = min(max_frames, math.floor((frame_count - 1) / step + _EPS) + 1)
    slack = (frame_count - 1) - (taken - 1) * step
    if offset is None:
        start = slack / 2
    else:
        starts = max(0, math.floor(slack + _EPS)) + 1  # the whole frames the clip may start at
        start = min(math.floor(offset * starts), starts - 1)
    return [math.floor(start + k * step + _EPS) for k in range(taken)]


def timed_frame_indices(
    times: Sequence[float], seconds: float, max_frames: int, offset: float | None
) -> list[int]:
    """``frame_indices`` for frames shown at ``times`` (seconds, strictly increasing: an encoded
    video's timestamps, which a variable-frame-rate video spaces unevenly) and a stride of
    ``seconds``: the clip's frames are a fixed time apart, each the last frame shown at or before
    its time. With ``gap`` the mean time between frames and ``D`` the last frame's time after the
    first's, ``step = max(seconds, gap)``, ``taken = min(max_frames, floor(D / step) + 1)``,
    ``slack = D - (taken - 1) * step``, and frame k is the last shown at or before
    ``start + k * step``:

    - training: ``start`` is the time of a frame shown within the slack, each such frame
      equally likely (the ``j``-th of ``m``, ``j = floor(offset * m)``);
    - evaluation (``offset`` None): ``start = slack / 2``.

    At a constant rate (``times`` k * gap) this is ``frame_indices`` exactly, since frame k at
    or before time T is ``floor(T / gap)``. A frame held on screen longer than the stride is
    taken again, as a constant-rate copy of the video would show it."""
    count = len(times)
    if count < 2:  # no time between frames: the one frame there is (or none, refused)
        return frame_indices(count, None, FrameStride(frames=1), max_frames, offset)
    relative = [t - times[0] for t in times]
    duration = relative[-1]
    gap = duration / (count - 1)
    eps = _EPS * gap  # frame_indices' tolerance, in seconds
    step = min(max(seconds, gap), duration + gap)
    taken = min(max_frames, math.floor(duration / step + _EPS) + 1)
    slack = duration - (taken - 1) * step
    if offset is None:
        start = slack / 2
    else:
        starts = bisect.bisect_right(relative, slack + eps)  # frames shown within the slack
        start = relative[min(math.floor(offset * starts), starts - 1)]
    return [bisect.bisect_right(relative, start + k * step + eps) - 1 for k in range(taken)]


def sample_clip(
    encoded: Encoded,
    size_px: int,
    max_frames: int,
    stride: FrameStride,
    rng: np.random.Generator | None,
    fps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A video -> (uint8 [max_frames, 3, size_px, size_px], bool [max_frames] mask of the real
    frames). ``rng`` draws where a training clip starts (one draw per video, whatever its
    length); None centres it (evaluation). ``fps`` is a frame list's rate (an encoded video
    knows its own); a stride in frames needs none. Raises ``UndecodableVideo``."""
    offset = None if rng is None else float(rng.random())
    if isinstance(encoded, (bytes, bytearray, memoryview)):
        frames = _decode_video(bytes(encoded), size_px, max_frames, stride, offset)
    else:
        try:
            indices = frame_indices(len(encoded), fps, stride, max_frames, offset)
        except ValueError as exc:  # UndecodableVideo included: a rate that makes no clip
            raise UndecodableVideo(_why(exc)) from None
        frames = [_decode_frame(encoded[i], size_px, i) for i in indices]
    return pad_clip(frames, max_frames)


def pad_clip(frames: Sequence[torch.Tensor], max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (uint8 [3, S, S] each, at most ``max_frames``) -> (the clip padded with zero
    frames, the mask of the real ones). An image in a mixture with videos is a one-frame clip."""
    # Data is made on the CPU, also where an evaluation reads it inside the device guard.
    clip = torch.zeros((max_frames, *frames[0].shape), dtype=torch.uint8, device="cpu")
    clip[: len(frames)] = torch.stack(list(frames))
    mask = torch.zeros(max_frames, dtype=torch.bool, device="cpu")
    mask[: len(frames)] = True
    return clip, mask


def video_info(encoded: Encoded, fps: float | None = None) -> VideoInfo:
    """Decode every frame (the shard writer's check that a video is whole) and count them;
    ``fps`` as in ``sample_clip``. Raises ``UndecodableVideo``."""
    if isinstance(encoded, (bytes, bytearray, memoryview)):
        try:
            with av.open(io.BytesIO(bytes(encoded))) as container:
                stream = _video_stream(container)
                _check_size(stream)
                count = sum(1 for _ in container.decode(stream))
                fps = _rate(stream)
        except (av.FFmpegError, IndexError, ValueError) as exc:
            raise UndecodableVideo(_why(exc)) from None
    else:
        for i, frame in enumerate(encoded):
            _decode_frame(frame, 1, i)
        count = len(encoded)
    if count == 0:
        raise UndecodableVideo("the video holds no frame")
    return VideoInfo(count, fps)


def encode_video(frames: np.ndarray, fps: float, container: str = "mp4") -> bytes:
    """uint8 [T, H, W, 3] (even H and W) -> an H.264 mp4 or VP8 webm file, near-lossless: how the
    demo corpus and the tests make videos."""
    # x264's SIMD code now and then gave another stream for the same frames (1 encode in 300
    # to 1 in 7, depending on what ran before); its C code gave the same bytes in thousands of
    # encodes, and at these sizes costs a millisecond more.
    h264 = {"crf": "12", "x264-params": "asm=0"}
    codec, options = {"mp4": ("libx264", h264), "webm": ("libvpx", {"crf": "4"})}[container]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1  # same bytes whatever the machine's cores; faster
        for pixels in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames
    return buffer.getvalue()


def _decode_video(
    data: bytes, size_px: int, max_frames: int, stride: FrameStride, offset: float | None
) -> list[torch.Tensor]:
    """Count the frames by demuxing (no decoding), then decode up to the last chosen one.

    A video whose end does not decode (a cut download: packets demux, their data is gone or
    broken) is read as the frames that decode before the first error. When decoding stops
    before the last chosen frame, the clip is chosen again over that decoded prefix, with the
    same offset, and decoded in a second pass; it is refused only when no frame decodes. So
    whether a broken video is served does not depend on the draw, and a clip is never made of
    frames that do not decode. Counting the decodable frames up front instead (as the writer
    does) would decode every frame of every video on every read, up to twice the decoding of
    stopping at the last chosen frame; this way only a broken video pays, once more."""

    def choose(count: int, rate: float | None, times: list[float] | None) -> list[int]:
        # A stride in seconds goes by the timestamps where every frame has its own.
        if stride.seconds is not None and times is not None and count > 1:
            shown = times[:count]
            if all(a < b for a, b in zip(shown, shown[1:])):
                return timed_frame_indices(shown, stride.seconds, max_frames, offset)
        return frame_indices(count, rate, stride, max_frames, offset)

    try:
        frames, decodable, count = _decode_chosen(data, size_px, choose)
        if frames is None and decodable:
            frames, _, _ = _decode_chosen(data, size_px, choose, prefix=decodable)
    except (av.FFmpegError, IndexError, ValueError) as exc:
        raise UndecodableVideo(_why(exc)) from None
    if frames is None:
        raise UndecodableVideo(f"{count} frames demuxed, but {decodable} of them decode")
    return frames


def _decode_chosen(
    data: bytes, size_px: int, choose: Callable, prefix: int | None = None
) -> tuple[list[torch.Tensor] | None, int, int]:
    """Decode the frames ``choose(count, rate, times)`` names, ``count`` being the demuxed frames
    (or ``prefix``) and ``times`` their timestamps in seconds in the order they are shown (None
    where a packet has none) -> (them, resized; or None where decoding stopped before the last
    of them, the frames decoded, the frames demuxed)."""
    with av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container)
        _check_size(stream)
        packets = list(container.demux(stream))  # the last, empty, flushes the decoder
        # A packet the container marks to discard (before an edit list's start) shows nothing.
        stamps = [packet.pts for packet in packets if packet.size and not packet.is_discard]
        count = len(stamps)
        times = None
        if None not in stamps:  # decoded frames come out in the order they are shown
            times = [float(pts * stream.time_base) for pts in sorted(stamps)]
        # A list: a frame held on screen past the stride is taken twice (timed_frame_indices).
        wanted = choose(count if prefix is None else prefix, _rate(stream), times)
        frames: dict[int, torch.Tensor] = {}
        decoded = 0
        try:
            for packet in packets:
                for frame in packet.decode():
                    if decoded in wanted:
                        pixels = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                        frames[decoded] = resize_square(pixels, size_px)
                    decoded += 1
                    if decoded > wanted[-1]:
                        return [frames[i] for i in wanted], decoded, count
        except (av.FFmpegError, ValueError):  # the frames before the error are the video
            pass
    return None, decoded, count


def _decode_frame(data: bytes, size_px: int, index: int) -> torch.Tensor:
    try:
        return decode_image(data, size_px)
    except Exception as exc:  # PIL raises many types for bad data
        raise UndecodableVideo(f"frame {index}: {type(exc).__name__}: {exc}") from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first video stream, decoded on the calling thread: data workers are the parallelism,
    and FFmpeg's own frame threads cost more to start than a short clip takes to decode (32 ms
    against 3 ms for 8 frames at 64 px)."""
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    return stream


def _check_size(stream: av.video.stream.VideoStream) -> None:
    """Refuse frames larger than PIL's decompression-bomb limit before decoding one: images have
    that guard (PIL's), and a 16K frame is 768 MB as RGB."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = stream.codec_context.width, stream.codec_context.height
    if limit and width * height > limit:
        raise UndecodableVideo(
            f"{width}x{height} frames: over PIL.Image.MAX_IMAGE_PIXELS ({limit} pixels)"
        )


def _rate(stream: av.video.stream.VideoStream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def _why(exc: Exception) -> str:
    if isinstance(exc, UndecodableVideo):
        return str(exc)
    if isinstance(exc, IndexError):
        return "no video stream"
    return f"{type(exc).__name__}: {exc}"
