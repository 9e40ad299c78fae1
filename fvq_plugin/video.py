"""Reading frames from face videos, and writing test/demo videos."""
from __future__ import annotations

import os
from typing import Iterable

import av
import numpy as np


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 24.0,
                bit_rate: int | None = None, crf: int | None = None) -> None:
    """Encode RGB uint8 frames [H,W,3] as H.264 (yuv420p) into an mp4 file.

    `bit_rate` (bits/s) or `crf` control quality; neither gives x264's default (crf 23).
    x264 runs single-threaded so the same frames always give the same bytes.
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
        options = {"threads": "1"}
        if crf is not None:
            options["crf"] = str(crf)
        if bit_rate is not None:
            stream.bit_rate = int(bit_rate)
        stream.options = options
        for frame in (first, *frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
