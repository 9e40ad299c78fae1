"""The bad-input corpus of issue 12, generated at test time: files a batch job over real-world
face videos meets, each with what every entry point must make of it.

`build_corpus(folder)` writes the files and returns {case: (path, expected)}. `expected` is
either ("score", flags that must be present) or ("error", a substring of the reason).
"""
from __future__ import annotations

import itertools
import os
import struct
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from fvq_plugin.video import write_video

SIZE = 128


def _face() -> np.ndarray:
    from skimage import data

    face = data.astronaut()[20:220, 130:330]  # the astronaut's head and shoulders
    return np.asarray(Image.fromarray(face).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def _moving(frame: np.ndarray, n: int) -> list[np.ndarray]:
    """`n` frames of `frame` drifting a pixel a frame (real motion, the same content)."""
    return [np.roll(frame, i, axis=1) for i in range(n)]


def encode(path, frames, fps=24, pix_fmt="yuv420p", time_base=None, pts=None):
    """Like write_video, fast (x264 ultrafast), with other pixel formats and explicit timestamps
    (variable frame rate); `frames` may be a generator, so long videos are never held in memory."""
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    frames = itertools.chain([first], frames)
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"threads": "1", "preset": "ultrafast"}
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                video_frame.pts, video_frame.time_base = pts[i], time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_audio_only(path):
    with av.open(os.fspath(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in (*stream.encode(frame), *stream.encode()):
            container.mux(packet)


def write_no_frames(path):
    """A header with a video stream, then no frame (an mp4 drops such a track; AVI keeps it)."""
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()


def set_display_rotation(path, clockwise_quarter_turns: int) -> None:
    """Write a display rotation into an mp4's track header (what phones do for portrait videos).

    PyAV cannot write one, and there is no ffmpeg binary here: the tkhd box's matrix is patched.
    """
    data = bytearray(Path(path).read_bytes())
    box = data.index(b"tkhd")
    version = data[box + 4]
    # type, version/flags, times/track/duration (20 or 32 bytes), reserved(8), layer/group/volume/reserved(8)
    matrix = box + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    one = 0x10000
    abcd = {1: (0, one, -one, 0), 2: (-one, 0, 0, -one), 3: (0, -one, one, 0)}[clockwise_quarter_turns % 4]
    struct.pack_into(">9i", data, matrix, abcd[0], abcd[1], 0, abcd[2], abcd[3], 0, 0, 0, 0x40000000)
    Path(path).write_bytes(bytes(data))


def build_corpus(folder) -> dict[str, tuple[Path, tuple]]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    face = _face()
    rng = np.random.default_rng(0)
    cases = {}

    def case(name, filename, expected):
        cases[name] = (folder / filename, expected)
        return folder / filename

    case("empty file", "empty.mp4", ("error", "empty file")).write_bytes(b"")
    case("random bytes named .mp4", "random.mp4", ("error", "pyav")).write_bytes(rng.bytes(4096))
    whole = folder / "whole.tmp.mp4"
    write_video(whole, _moving(face, 24))
    data = whole.read_bytes()
    whole.unlink()
    # PyAV writes the index (moov) last: the cut-off file has frames but no index.
    case("truncated mp4", "truncated.mp4", ("error", "pyav")).write_bytes(data[: len(data) * 6 // 10])
    write_no_frames(case("zero-frame video", "zero_frames.avi", ("error", "no video frames")))
    write_video(case("1-frame video", "one_frame.mp4", ("score", {"repeated_frames"})), [face])
    write_video(case("3-frame video", "three_frames.mp4", ("score", {"repeated_frames"})), _moving(face, 3))
    write_audio_only(case("audio-only file", "audio_only.mp4", ("error", "no video stream")))
    gray = np.repeat(np.asarray(Image.fromarray(face).convert("L"))[..., None], 3, axis=2)
    encode(case("grayscale (gray pixel format)", "grayscale.mp4", ("score", set())), _moving(gray, 12), pix_fmt="gray")
    large = np.asarray(Image.fromarray(face).resize((3840, 2160), Image.Resampling.BILINEAR))
    encode(case("very large resolution (3840x2160)", "uhd.mp4", ("score", set())), _moving(large, 8))
    tall = np.asarray(Image.fromarray(face).resize((32, 2000), Image.Resampling.BILINEAR))
    encode(case("extreme aspect ratio (32x2000)", "tall.mp4", ("score", {"no_face"})), _moving(tall, 12))
    vfr_pts = [0, 40, 80, 300, 320, 1000, 1010, 1020, 2500, 2540, 2580, 2620]
    encode(case("variable frame rate", "vfr.mp4", ("score", set())), _moving(face, 12), time_base=Fraction(1, 1000),
            pts=vfr_pts)
    rotated = case("rotation metadata (90 degrees)", "rotated.mp4", ("score", set()))
    write_video(rotated, _moving(np.ascontiguousarray(np.rot90(face, 1)), 12))  # stored sideways, shown upright
    set_display_rotation(rotated, 1)
    no_face = np.zeros((SIZE, SIZE, 3), np.uint8)
    no_face[:] = np.linspace(30, 220, SIZE, dtype=np.uint8)[None, :, None]
    write_video(case("no face", "no_face.mp4", ("score", {"no_face"})), _moving(no_face, 12))
    grid = np.concatenate([np.concatenate([face, face], axis=1)] * 2, axis=0)
    write_video(case("many faces (2x2 grid)", "many_faces.mp4", ("score", {"multiple_faces"})), _moving(grid, 12))
    Image.fromarray(face).save(case("an image where a video is expected", "photo.png", ("score", {"repeated_frames"})))
    case("a directory", "folder.mp4", ("error", "is a directory")).mkdir()
    unreadable = case("an unreadable file", "unreadable.mp4", ("error", "Permission denied"))
    write_video(unreadable, _moving(face, 12))
    unreadable.chmod(0)
    name = os.fsdecode(b"caf\xe9-latin1-name.mp4")  # not UTF-8: held as a surrogate escape
    write_video(case("a non-UTF-8 file name", name, ("score", set())), _moving(face, 12))
    return cases


class HangOn:
    """A frame preparer that never returns for files whose name contains `marker`, as a decoder stuck in
    C code would not, and is `preparer` for every other file. Picklable, for worker processes."""

    def __init__(self, marker: str, preparer):
        self.marker, self.preparer, self.spatial = marker, preparer, preparer.spatial

    def __call__(self, path):
        if self.marker in os.path.basename(path):
            time.sleep(3600)
        return self.preparer(path)

    def key(self) -> dict:
        return self.preparer.key()
