"""Names several modules share, each defined once here, and the file-hash helper; imports nothing heavy."""
from __future__ import annotations

import hashlib
import os

STREAMS = ("spatial", "portrait", "face", "temporal")
LEVELS = ("bad", "poor", "fair", "good", "excellent")
# What a training run's best/ checkpoint keeps (fvq_plugin.train explains the default, the first).
KEY_METRICS = ("srcc-rmse", "srcc")

WEIGHTS_ENV = "FVQ_RATER_WEIGHTS"        # an FVQ-Rater checkpoint folder
LITE_WEIGHTS_ENV = "FVQ_RATER_LITE_WEIGHTS"  # an fvq_rater_lite (student) checkpoint folder
FACE_MODELS_ENV = "FVQ_FACE_MODELS"      # a folder of insightface ONNX models
DATA_ROOT_ENV = "FVQ20K_ROOT"            # the FVQ-20K root the lmms-eval tasks read
DISCOVERY_ENV = "FVQ_PLUGIN_DISCOVERY"   # 0 turns off the import hook that registers the plugin


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """`path` holds the old text or the new, never a cut-off one: written beside, then renamed over it."""
    partial = f"{os.fspath(path)}.partial"
    # surrogateescape: a file name that is not UTF-8 (held as surrogates) is written back as its own bytes
    with open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as file:
        file.write(text)
    os.replace(partial, path)


def open_for_appending(path: str | os.PathLike):
    """`path` opened to append lines (JSONL results). A killed run may have left its last line cut short:
    a newline is written first, so that line cannot swallow the next one (readers skip the broken line)."""
    sink = open(path, "a", encoding="utf-8")
    if sink.tell():
        with open(path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                sink.write("\n")
    return sink


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (model files can be gigabytes)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, algorithm).hexdigest()


def forkserver_context(*preload: str):
    """multiprocessing's forkserver context, its server importing `preload` before it forks any worker: each
    worker then starts with them loaded, where importing torch and pyiqa again would take seconds per worker.
    The server is one per process, started at its first use: the first caller's modules are the ones it holds."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))  # a module that fails to import is skipped
    return context


def video_flags(info: dict) -> list[str]:
    """What a score should be read with: the video was too short for the sampled frames (or is an
    image), no sampled frame showed a face (the face stream then carries the learned no-face token),
    or some frame showed several faces (the most prominent one was embedded)."""
    flags = ["repeated_frames"] if info.get("repeated") else []
    if info.get("face_frames") == 0:
        flags.append("no_face")
    if info.get("most_faces", 0) > 1:
        flags.append("multiple_faces")
    return flags
