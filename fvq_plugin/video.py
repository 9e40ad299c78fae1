"""Reading frames from face videos, and writing test/demo videos.

Frames are addressed by their index in presentation order (decord's convention); the PyAV
reader maps decoded frames to indices through the demuxed timestamps so both backends agree.
decord 0.6.0 returns wrong frames from open-GOP H.264, AVI with B-frames and MPEG-TS files, and
silently reads only the intact part of a truncated mp4 whose index comes first; PyAV reads those
correctly or raises, and is no slower, so backend="auto" tries PyAV first and decord second.
PyAV frames are turned upright by the video's display rotation; decord ignores it, and `probe`
reports the coded size.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import av
import cv2
import numpy as np
from PIL import Image

from .recipe import FRAME_SAMPLINGS

BACKENDS = ("pyav", "decord")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# What `fvq-rater score FOLDER` picks up; any file FFmpeg decodes can still be named directly.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp")


class VideoReadError(RuntimeError):
    """A video (or image) could not be read; `reason` says why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # The default pickling replays args=(message,) and would fail in DataLoader workers.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    n_frames: int
    duration: float
    width: int
    height: int
    backend: str


@dataclass
class Clip:
    frames: np.ndarray   # uint8 [T, H, W, 3], RGB
    indices: np.ndarray  # int64 [T], source frame indices
    info: VideoInfo
    repeated: bool       # the video has fewer frames than requested


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 24.0,
                bit_rate: int | None = None, crf: int | None = None, keyframe_interval: int | None = None) -> None:
    """Encode RGB uint8 frames [H,W,3] as H.264 (yuv420p) into an mp4 file.

    `bit_rate` (bits/s) or `crf` control quality; neither gives x264's default (crf 23).
    `keyframe_interval` (frames) defaults to x264's 250.
    The same frames always give the same bytes: x264 runs single-threaded and without its
    macroblock-tree look-ahead, which reads uninitialised memory and made outputs differ.
    """
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs even frame sizes, got {width}x{height}")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        options = {"threads": "1", "x264-params": "no-mbtree=1"}
        if crf is not None:
            options["crf"] = str(crf)
        if keyframe_interval is not None:
            options["g"] = str(keyframe_interval)
        if bit_rate is not None:
            stream.bit_rate = int(bit_rate)
        stream.options = options
        for frame in (first, *frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _check_counts(n_total: int, n: int) -> None:
    if n_total < 1 or n < 1:
        raise ValueError(f"need n_total >= 1 and n >= 1, got n_total={n_total}, n={n}")


def uniform_indices(n_total: int, n: int) -> np.ndarray:
    """Centres of `n` equal segments of `n_total` frames; repeats frames when n_total < n."""
    _check_counts(n_total, n)
    i = np.arange(n, dtype=np.int64)
    # floor((i + 0.5) * n_total / n) in integers, so no float rounding can shift an index
    return (2 * i + 1) * n_total // (2 * n)


def internvl_indices(n_total: int, n: int) -> np.ndarray:
    """InternVL's (and FineVQ's) get_index with no bound: int(seg/2 + round(seg*i)), seg = (n_total-1)/n.

    np.round rounds half to even, as theirs does. The last frame is skipped unless the video has
    fewer frames than samples.
    """
    _check_counts(n_total, n)
    segment = (n_total - 1) / n
    return np.array([int(segment / 2 + np.round(segment * i)) for i in range(n)], dtype=np.int64)


def leading_indices(n_total: int, n: int) -> np.ndarray:
    """The first `n` frames (spread over all of them when n_total < n): only the clip's start is decoded,
    which is what a screening model that cannot afford to decode the whole clip reads."""
    _check_counts(n_total, n)
    return np.arange(n, dtype=np.int64) * min(n_total, n) // n


SAMPLERS = {"internvl": internvl_indices, "centres": uniform_indices, "leading": leading_indices}
assert set(FRAME_SAMPLINGS) <= set(SAMPLERS), "every recipe frame sampling needs its function here"


def frame_indices(n_total: int, n: int, sampling: str = "centres") -> np.ndarray:
    """The `n` frame indices a recipe's frame sampling picks from `n_total` frames."""
    if sampling not in SAMPLERS:
        raise ValueError(f"unknown frame sampling {sampling!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampling](n_total, n)


def probe(path: str | os.PathLike, backend: str = "auto") -> VideoInfo:
    """Metadata only: PyAV decodes nothing, decord decodes frame 0 to learn the size."""
    return _read(path, backend, None)[0]


def sample_frames(path: str | os.PathLike, n: int = 8, backend: str = "auto", sampling: str = "centres") -> Clip:
    """`n` frames at `frame_indices(..., sampling)`; only those frames are decoded."""
    return _clip(*_read(path, backend, ((n, sampling),)), n, sampling)


def dense_clip(path: str | os.PathLike, n: int = 32, short_side: int = 224, backend: str = "auto") -> Clip:
    """`n` frames spread over the whole video, shrunk so the short side is <= `short_side`."""
    _check_short_side(short_side)
    return _clip(*_read(path, backend, ((n, "centres"),)), n, short_side=short_side)


def sample_and_dense(path: str | os.PathLike, n: int = 8, dense_n: int = 32, short_side: int = 224,
                     backend: str = "auto", sampling: str = "centres") -> tuple[Clip, Clip]:
    """`sample_frames(path, n, sampling=sampling)` and `dense_clip(path, dense_n, short_side)` from one
    decoding pass."""
    _check_short_side(short_side)
    read = _read(path, backend, ((n, sampling), (dense_n, "centres")))
    return _clip(*read, n, sampling), _clip(*read, dense_n, short_side=short_side)


def all_frames(path: str | os.PathLike, backend: str = "auto", max_frames: int = 1200,
               size: int | tuple[int, int] | None = None, first: int | None = None) -> Clip:
    """Every frame of the video, in presentation order (FineVQ's motion input); with `first`, only the
    first `first` frames (consecutive frames, e.g. for VIIDEO), whatever the video's length.

    `size` (an int, or (width, height)) stretches each frame, without cropping, with PIL's
    bicubic `Image.resize` (what FineVQ's `dynamic_preprocess(max_num=1)` does) as soon as it is
    decoded, so memory stays at most `max_frames` resized frames (448: 0.6 MB each, 0.72 GB for
    1200 frames) plus one decoded frame; with size=None frames keep their decoded size. A video
    with more than `max_frames` frames is refused (VideoReadError) before or while decoding.
    Frames are decoded in one sequential pass (no seeking); backend="auto" tries PyAV, then decord.
    """
    if max_frames < 1 or (first is not None and first < 1):
        raise ValueError(f"max_frames and first must be >= 1, got {max_frames} and {first}")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be a positive int or (width, height), got {size}")
    path = os.fspath(path)
    info = probe(path, backend)  # checks the path and the backend, and counts frames cheaply
    too_many = (f"{{}} frames, more than max_frames={max_frames}: every frame is decoded and kept, so "
                f"longer videos are refused to bound memory (raise max_frames, or trim the video)")
    if first is not None:
        max_frames = first
    elif info.n_frames > max_frames:
        raise VideoReadError(path, too_many.format(info.n_frames))
    if info.backend == "image":
        frames = _read(path, backend, ((1, "centres"),))[2]
        frames = np.stack([stretch(f, size) for f in frames])
        return Clip(frames, np.zeros(1, np.int64), info, repeated=False)

    def decode(reader):
        def run(p, _counts):
            out = _Frames(p, min(info.n_frames, max_frames))
            for frame in reader(p):
                if len(out) == max_frames:
                    if first is not None:
                        break
                    raise VideoReadError(p, too_many.format(f"over {max_frames}"))
                out.append(stretch(frame, size))
            if not out:
                raise VideoReadError(p, "no video frames")
            return out.array
        return run

    readers = {"pyav": _iter_pyav, "decord": _iter_decord}
    names = list(BACKENDS) if backend == "auto" else [backend]
    names.sort(key=lambda name: name != info.backend)  # the backend that probed it first
    errors = []
    for name in names:
        try:
            frames = _guarded(path, name, decode(readers[name]), None)
            break
        except VideoReadError as error:
            if "max_frames" in error.reason:
                raise
            errors.append(error)
    else:
        raise VideoReadError(path, "; ".join(e.reason for e in errors)) from errors[-1]
    n = len(frames)
    info = replace(info, n_frames=n, duration=_duration(n, info.fps), backend=name)
    return Clip(frames, np.arange(n, dtype=np.int64), info, repeated=False)


def stretch(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """`frame` resized to size = (width, height) by PIL's bicubic filter, without cropping (FineVQ's
    `dynamic_preprocess(max_num=1)`: `Image.resize`); None: as is."""
    if size is None or (frame.shape[1], frame.shape[0]) == size:
        return frame
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize(size, Image.Resampling.BICUBIC))


def _iter_pyav(path):
    """All frames, decoded from the start; the decoder outputs them in presentation order."""
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield _displayed(frame)


def _iter_decord(path, chunk: int = 32):
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    for start in range(0, len(reader), chunk):
        yield from reader.get_batch(list(range(start, min(start + chunk, len(reader))))).asnumpy()


def _clip(info, unique, frames, n, sampling="centres", short_side=None) -> Clip:
    """The `n` sampled frames, picked from the decoded `unique` indices (shrunk so the short side is
    at most `short_side`). No full-size frame is copied when the sample is the decoded frames themselves."""
    indices = frame_indices(info.n_frames, n, sampling)
    positions = np.searchsorted(unique, indices)
    height, width = frames.shape[1:3]
    scale = short_side / min(height, width) if short_side else 1
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # Resizing here rather than in decord keeps both backends' pixels identical.
        picked = np.stack([cv2.resize(frames[p], size, interpolation=cv2.INTER_AREA) for p in positions])
    elif np.array_equal(positions, np.arange(len(frames))):
        picked = frames
    else:
        picked = frames[positions]
    return Clip(picked, indices, info, repeated=info.n_frames < n)


def _check_short_side(short_side):
    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")


def _targets(n_frames: int, samplings) -> np.ndarray:
    """Sorted unique frame indices needed by every requested (count, sampling)."""
    return np.unique(np.concatenate([frame_indices(n_frames, n, sampling) for n, sampling in samplings]))


def _read(path, backend, counts):
    """(info, unique sorted indices, their frames) for the (count, sampling) pairs in `counts`;
    with counts=None only info is read."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid: {', '.join(('auto',) + BACKENDS)}")
    for n, sampling in counts or ():
        frame_indices(1, n, sampling)  # reject a bad n or sampling before touching the file
    path = check_file(path)
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return _guarded(path, "image", _read_image, counts)
    if backend != "auto":
        return _guarded(path, backend, _read_decord if backend == "decord" else _read_pyav, counts)
    try:
        return _guarded(path, "pyav", _read_pyav, counts)
    except VideoReadError as pyav_error:
        if pyav_error.reason.endswith(_NOTHING_TO_DECODE):  # no decoder can do better
            raise
        try:
            return _guarded(path, "decord", _read_decord, counts)
        except VideoReadError as decord_error:
            raise VideoReadError(path, f"{pyav_error.reason}; {decord_error.reason}") from decord_error


def check_file(path: str | os.PathLike) -> str:
    """`path` as a str if it names a non-empty regular file; else VideoReadError saying what it is."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoReadError(path, "no such file")
    if os.path.isdir(path):
        raise VideoReadError(path, "is a directory, not a video file")
    # Anything but a regular file (a FIFO, a device) could block a decoder forever.
    if not os.path.isfile(path):
        raise VideoReadError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file")
    return path


_NOTHING_TO_DECODE = ("no video stream", "no video frames")
# decord prefixes its messages with a time and its own source file: "[07:13:52] /src/video_reader.cc:83: "
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _guarded(path, name, reader, counts):
    """Run one backend, turning whatever it raises into a VideoReadError naming the cause."""
    try:
        return reader(path, counts)
    except VideoReadError as error:
        raise VideoReadError(path, f"{name}: {error.reason}") from error
    except Exception as error:
        # decord's messages carry a C++ stack trace after the first line
        message = _DECORD_PREFIX.sub("", (str(error).strip().splitlines() or [""])[0])
        raise VideoReadError(path, f"{name}: {type(error).__name__}: {message}") from error


def _duration(n_frames, fps):
    return n_frames / fps if fps > 0 else 0.0


def _read_image(path, counts):
    with Image.open(path) as image:
        frame = np.asarray(image.convert("RGB"))
    height, width = frame.shape[:2]
    return VideoInfo(path, 0.0, 1, 0.0, width, height, "image"), np.zeros(1, np.int64), frame[None]


def _read_decord(path, counts):
    import decord  # imported lazily: loading it is slow and PyAV-only users do not need it

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    n_frames = len(reader)
    if n_frames < 1:
        raise VideoReadError(path, "no video frames")
    fps = float(reader.get_avg_fps())
    if counts is None:
        unique, frames = None, None
        height, width = reader[0].shape[:2]  # decord exposes the size only through a frame
    else:
        unique = _targets(n_frames, counts)
        frames = reader.get_batch(unique.tolist()).asnumpy()
        height, width = frames.shape[1:3]
    return VideoInfo(path, fps, n_frames, _duration(n_frames, fps), width, height, "decord"), unique, frames


def _read_pyav(path, counts):
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        info = VideoInfo(path, fps, 0, 0.0, stream.codec_context.width, stream.codec_context.height, "pyav")
        declared = _plausible_frame_count(container, stream, fps)
        if declared and counts is None:
            return replace(info, n_frames=declared, duration=_duration(declared, fps)), None, None
        # Timestamps of every frame, found by demuxing only (cheap: nothing is decoded).
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
        n_frames = declared or len(packets)
        if n_frames < 1:
            raise VideoReadError(path, "no video frames")
        info = replace(info, n_frames=n_frames, duration=_duration(n_frames, fps))
        if counts is None:
            return info, None, None
        unique = _targets(n_frames, counts)
        frames = _decode_pyav(path, container, packets, unique, n_frames)
    height, width = frames.shape[1:3]  # displayed size: a rotated video's differs from the coded one
    return replace(info, width=width, height=height), unique, frames


def _plausible_frame_count(container, stream, fps):
    """The container's frame count, or 0 when it is missing or disagrees with the duration."""
    frames = stream.frames
    if stream.duration is not None and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return frames
    if frames > 0 and fps > 0 and abs(frames - seconds * fps) > max(2.0, 0.05 * frames):
        return 0
    return frames


class _SeekMissed(Exception):
    """A seek landed somewhere other than the keyframe it aimed at."""


def _decode_pyav(path, container, packets, targets, n_frames):
    """Decode the frames at sorted unique `targets`, seeking past long runs of unwanted frames.
    `container` is the open file whose `packets` were demuxed: it seeks back rather than open the file again.

    When the timestamps show B-frame reordering they are true presentation times, and a decoded
    frame's index is the rank of its pts; this also holds for open-GOP streams, whose leading
    frames decode after their keyframe. Timestamps in decode order are either the presentation
    order (no B-frames) or fake (AVI stores decode times), so frames are then counted from the
    keyframe the decoder restarted at.
    """
    if len(packets) <= targets[-1]:
        raise VideoReadError(path, f"frame {targets[-1]} is unreadable: only {len(packets)} of "
                                   f"{n_frames} frames are in the file (truncated?)")
    timestamps = [pts for pts, _ in packets]
    if None in timestamps or len(set(timestamps)) < len(timestamps):
        # Without usable timestamps frames can only be counted from the start of a freshly opened file.
        return _decode_pyav_frames(path, None, targets, None, False, [0])
    order = sorted(timestamps)
    rank = {pts: i for i, pts in enumerate(order)}
    keyframes = sorted(rank[pts] for pts, key in packets if key)
    try:
        return _decode_pyav_frames(path, container, targets, order, timestamps != order, keyframes)
    except _SeekMissed:
        # Some containers (MPEG-TS) seek imprecisely; decoding a freshly opened file from the start is always right.
        return _decode_pyav_frames(path, None, targets, order, timestamps != order, [0])


def _decode_pyav_frames(path, demuxed, targets, order, by_pts, keyframes):
    """`demuxed`: the open container, read to its end, which seeks to the first target's keyframe;
    None: the file is opened afresh and decoded from its start."""
    rank = {pts: i for i, pts in enumerate(order or ())}
    out = _Frames(path, len(targets))
    with contextlib.nullcontext(demuxed) if demuxed is not None else av.open(path) as container:
        # PyAV's default threading; frame threading would refill its pipeline after every seek.
        stream = container.streams.video[0]
        decoded = enumerate(container.decode(stream)) if demuxed is None else iter(())
        position, landing = (-1 if demuxed is None else -2), None  # -2: the first target seeks, even to frame 0
        for target in targets:
            i = bisect.bisect_right(keyframes, target)
            keyframe = keyframes[i - 1] if i else 0
            if keyframe > position + 1:
                container.seek(order[keyframe], backward=True, any_frame=False, stream=stream)
                decoded = enumerate(container.decode(stream), start=keyframe)
                landing = keyframe
            for count, frame in decoded:
                position = rank.get(frame.pts) if by_pts else count
                if position is None:
                    raise VideoReadError(path, f"decoded a frame with unknown timestamp {frame.pts}")
                if landing is not None:
                    # Landing early is harmless when frames are known by pts, but not when counted.
                    landed = rank.get(frame.pts, -1)
                    if landed > landing or (not by_pts and landed != landing):
                        raise _SeekMissed
                    landing = None
                if position >= target:
                    break
            if position != target:
                raise VideoReadError(path, f"frame {target} could not be decoded "
                                           f"(reached frame {position}; truncated or corrupt?)")
            out.append(_displayed(frame))
    return out.array


class _Frames:
    """Decoded frames written straight into one array: a list joined by np.stack would hold every
    frame twice at the peak. Grows by doubling when `capacity` (a container's frame count) was short."""

    def __init__(self, path, capacity: int):
        self.path, self.capacity, self.count, self._array = path, max(1, capacity), 0, None

    def append(self, frame: np.ndarray) -> None:
        if self._array is None:
            self._array = np.empty((self.capacity, *frame.shape), frame.dtype)
        elif frame.shape != self._array.shape[1:]:
            raise VideoReadError(self.path, f"the frame size changes within the video, from "
                                            f"{self._array.shape[2]}x{self._array.shape[1]} to {frame.shape[1]}x{frame.shape[0]}")
        elif self.count == len(self._array):
            self._array = np.concatenate([self._array, np.empty_like(self._array)])
        self._array[self.count] = frame
        self.count += 1

    def __len__(self):
        return self.count

    @property
    def array(self) -> np.ndarray:
        return self._array[:self.count]


def _displayed(frame) -> np.ndarray:
    """RGB pixels as a player shows them: a phone's portrait video is stored landscape with a display
    rotation, and a sideways face would defeat the face detector and mislead the rater."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = round(frame.rotation / 90) % 4  # PyAV: degrees counter-clockwise, as np.rot90 turns
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels
