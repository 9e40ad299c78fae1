"""Scoring many videos: features in background workers, cached on disk, the model in batches.

Decoding and the CPU feature models run in DataLoader workers ahead of the device; SlowFast and
the rater run batched on the device. Features are cached per file content and extractor
configuration, so a second run (or another checkpoint using the same extractors) skips them.
A video that cannot be read is recorded with its reason and the run goes on; results are
appended to a JSONL file as they come, which is also how an interrupted run resumes. Each line
carries the hash of the video's bytes and the scorer's fingerprint (weights, settings, versions):
a changed video is scored again, and a file written by another scorer is refused, never reused.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .common import file_digest, forkserver_context, open_for_appending, video_flags, write_atomically
from .errors import InputError
from .video import VideoReadError, check_file

if TYPE_CHECKING:  # the feature pipeline (torchvision) loads with the first FVQ-Rater, not with this module
    from .features import FeatureExtractor

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    path: str
    features: dict | None   # None when the video failed
    error: str | None = None
    cached: bool = False
    content: str | None = None  # hash of the file's bytes (None when it could not be read)


class ResultsFileError(InputError):
    """An --output file that holds results this run must not resume from."""


class FeatureCache:
    """One safetensors file per (video content, extractor configuration), written atomically."""

    def __init__(self, directory, extractor_digest: str):
        self.directory = Path(directory) / extractor_digest

    @staticmethod
    def content_key(path) -> str:
        return file_digest(path, "blake2b")[:32]

    def _file(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict | None:
        from safetensors import safe_open

        file = self._file(key)
        if not file.is_file():
            return None
        try:
            with safe_open(file, "pt") as handle:
                features = {name: handle.get_tensor(name) for name in handle.keys()}
                features["info"] = json.loads(handle.metadata()["info"])
        except Exception as error:  # a damaged cache file is recomputed, not fatal
            log.warning("ignoring unreadable cache file %s: %s", file, error)
            return None
        return features

    def save(self, key: str, features: dict) -> None:
        from safetensors.torch import save_file

        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in features.items() if isinstance(v, torch.Tensor)}
        handle, temporary = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata={"info": json.dumps(features["info"])})
            os.replace(temporary, file)  # readers never see a half-written file
        finally:
            Path(temporary).unlink(missing_ok=True)


class _PreparedVideos(Dataset):
    """Runs in DataLoader workers: cache lookup, else decoding and the CPU feature models."""

    def __init__(self, paths, preparer, cache: FeatureCache | None):
        self.paths, self.preparer, self.cache = [str(p) for p in paths], preparer, cache

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return prepare_video(self.paths[index], self.preparer, self.cache)


def prepare_video(path, preparer, cache: FeatureCache | None, read_as=None) -> Extracted:
    """One video's cache lookup, else its decoding and CPU features; a failure is returned, never raised.
    `read_as`: a local copy of the file to read in place of `path` (which stays the video's name)."""
    local = str(read_as or path)
    try:
        key = FeatureCache.content_key(check_file(local))
    except VideoReadError as error:
        return Extracted(path, None, error.reason)
    except OSError as error:
        return Extracted(path, None, f"cannot read file: {error.strerror or error}")
    cached = cache.load(key) if cache else None
    if cached is not None:
        return Extracted(path, cached, cached=True, content=key)
    try:
        return Extracted(path, preparer(local), content=key)
    except VideoReadError as error:
        return Extracted(path, None, error.reason, content=key)
    except Exception as error:  # one bad video must not end a 20,000-video run
        log.exception("feature extraction failed for %s", path)
        return Extracted(path, None, f"{type(error).__name__}: {error}", content=key)


def finish_features(items: list[Extracted], extractor: FeatureExtractor, cache: FeatureCache | None) -> None:
    """The batched device work (SlowFast) of freshly prepared videos, then their cache files."""
    fresh = [item for item in items if item.features is not None and not item.cached]
    extractor.finish([item.features for item in fresh])
    if cache is not None:
        for item in fresh:
            cache.save(item.content, item.features)


def _one_thread_per_worker(_=None):
    # Workers are the parallelism; their own thread pools would only contend for the cores.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


_worker_videos: _PreparedVideos | None = None  # the pool worker's copy (timed preparation)


def _start_timed_worker(videos: _PreparedVideos) -> None:
    global _worker_videos
    _one_thread_per_worker()
    _worker_videos = videos


def _prepare_in_worker(index: int) -> Extracted:
    return _worker_videos[index]


def _in_order(paths, schedule, outcome, window: int) -> Iterator[Extracted]:
    """Each video's outcome in input order, with at most `window` videos scheduled ahead, so memory stays flat."""
    pending = deque()
    for index, path in enumerate(paths):
        pending.append((path, schedule(index)))
        if len(pending) == window:
            yield outcome(*pending.popleft())
    while pending:
        yield outcome(*pending.popleft())


def _batched(items: Iterator[Extracted], batch_size: int) -> Iterator[list[Extracted]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _timed_batches(videos: _PreparedVideos, batch_size: int, workers: int, timeout: float) -> Iterator[list[Extracted]]:
    """Like the DataLoader, but a video still being prepared after `timeout` seconds is recorded as
    failed: pebble stops that worker process (a decoder stuck in C code cannot be interrupted from
    Python) and starts another."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from pebble import ProcessPool

    def outcome(path, future) -> Extracted:
        try:
            return future.result()
        except FutureTimeout:
            return Extracted(path, None, f"timed out: not decoded within {timeout:g} s (--timeout-per-video)")
        except Exception as error:  # the worker process died (e.g. killed for memory): this video only
            return Extracted(path, None, f"{type(error).__name__}: {error}")

    with ProcessPool(max_workers=workers, initializer=_start_timed_worker, initargs=(videos,),
                     context=forkserver_context(__name__)) as pool:
        prepared = _in_order(videos.paths, lambda index: pool.schedule(_prepare_in_worker, (index,), timeout=timeout),
                             outcome, window=max(2 * batch_size, 2 * workers))
        yield from _batched(prepared, batch_size)


def _threaded_batches(videos: _PreparedVideos, batch_size: int, threads: int) -> Iterator[list[Extracted]]:
    """Preparation in threads of this process, ahead of the model: no worker process to start, and
    the decoders, OpenCV and onnxruntime let go of the GIL while they work. Each thread prepares
    with its own copy of the preparer, as a worker process would (detectors are not safe to share)."""
    from concurrent.futures import ThreadPoolExecutor

    pickled, local = pickle.dumps(videos), threading.local()

    def prepare(index: int) -> Extracted:
        if not hasattr(local, "videos"):
            local.videos = pickle.loads(pickled)
        return local.videos[index]

    with ThreadPoolExecutor(threads, thread_name_prefix="fvq-prepare") as pool:
        prepared = _in_order(videos.paths, lambda index: pool.submit(prepare, index), lambda _, future: future.result(),
                             window=max(2 * batch_size, 2 * threads))
        yield from _batched(prepared, batch_size)


def check_parallelism(workers: int = 0, threads: int = 0, timeout: float | None = None) -> None:
    """Preparation runs in this process, in worker processes or in threads: one at a time."""
    if workers < 0 or threads < 0:
        raise InputError(f"workers and threads are counts, got workers={workers}, threads={threads}")
    if threads and (workers or timeout is not None):
        raise InputError("threads prepare videos in this process; they do not combine with worker processes "
                         "(workers, or a timeout per video, which needs processes it can stop)")


def extract_features(paths, extractor: FeatureExtractor, cache_dir=None, batch_size: int = 8, workers: int = 0,
                     progress: bool = True, timeout: float | None = None,
                     threads: int = 0) -> Iterator[list[Extracted]]:
    """Batches of per-video features (or failures), in input order.

    Preparation (decoding, the CPU feature models) runs ahead of the device work in `workers`
    processes, or in `threads` threads of this process, or else inline. With `timeout` (seconds
    per video) it runs in max(1, workers) processes that are stopped when a video takes longer;
    that video is recorded as failed and the run goes on.
    """
    check_parallelism(workers, threads, timeout)
    cache = FeatureCache(cache_dir, extractor.key_digest()) if cache_dir else None
    videos = _PreparedVideos(paths, extractor.preparer, cache)
    if timeout is not None:
        batches = _timed_batches(videos, batch_size, max(1, workers), timeout)
    elif threads:
        batches = _threaded_batches(videos, batch_size, threads)
    else:
        # Workers start from a forkserver process that has imported this module but run nothing: a plain
        # fork of a parent that already ran OpenMP (torch, cv2) deadlocks in the child.
        batches = DataLoader(videos, batch_size=batch_size, num_workers=workers, collate_fn=list,
                             worker_init_fn=_one_thread_per_worker,
                             multiprocessing_context=forkserver_context(__name__) if workers else None)
    with tqdm(total=len(paths), desc="features", unit="video", disable=not progress) as bar:
        for items in batches:
            finish_features(items, extractor, cache)
            bar.update(len(items))
            yield items


def feature_config(features: dict, overrides: dict | None = None):
    """A checkpoint's feature settings with the given ones in their place (None: the checkpoint's)."""
    from .features import FeatureConfig

    return FeatureConfig.from_dict({**features, **{k: v for k, v in (overrides or {}).items() if v is not None}})


def checkpoint_extractor(checkpoint, feature_overrides: dict | None = None, device="cpu"):
    """The feature extractor a checkpoint scores with (as `Scorer.from_pretrained` builds it), without its model."""
    from .checkpoint import feature_settings, read_config
    from .features import FeatureExtractor
    from .lite import LiteExtractor, is_student, load_student

    if is_student(checkpoint):
        return LiteExtractor(load_student(checkpoint).config)
    features = feature_settings(checkpoint, read_config(checkpoint).get("features", {}))
    return FeatureExtractor(feature_config(features, feature_overrides), device=device)


class Scorer:
    """FVQ-Rater over many videos: one model load, batched features and forwards, resumable output."""

    def __init__(self, model, extractor: FeatureExtractor, batch_size: int = 8, workers: int = 0,
                 cache_dir=None, timeout_per_video: float | None = None, threads: int = 0):
        self.model, self.extractor = model.eval(), extractor
        self.batch_size, self.workers, self.threads, self.cache_dir = batch_size, workers, threads, cache_dir
        if timeout_per_video is not None and not timeout_per_video > 0:
            raise InputError(f"the timeout per video must be a positive number of seconds, got {timeout_per_video}")
        check_parallelism(workers, threads, timeout_per_video)
        self.timeout_per_video = timeout_per_video
        self.resumed = 0  # videos the last score() call took from its output file
        self._check_compatible()

    def _check_compatible(self):
        config, features = self.model.config, self.extractor.config
        if set(config.streams) - set(features.streams):
            raise InputError(f"the model needs streams {config.streams}, the extractor gives {features.streams}")
        if "face" in config.streams and self.extractor.face_dim != config.face_dim:
            raise InputError(f"face backend {features.face_backend!r} gives {self.extractor.face_dim}-d embeddings "
                             f"but the model was trained on {config.face_dim}-d ones")
        features.check_recipe(config.recipe, config.streams)

    @classmethod
    def from_pretrained(cls, checkpoint, device="cpu", dtype=None, device_map=None, attn_implementation=None,
                        feature_overrides: dict | None = None, merge_lora: bool = True, **options) -> "Scorer":
        """Load a checkpoint and the feature extractors it was trained with (settings may be overridden).

        Without a device_map the backbone loads straight onto `device` (no copy built on the CPU first);
        with one (e.g. "auto") it stays where accelerate dispatched it. LoRA is merged for inference.
        """
        from .features import FeatureExtractor
        from .model import FVQRater

        model = FVQRater.from_pretrained(checkpoint, dtype=dtype, device_map=device_map or {"": str(device)},
                                         attn_implementation=attn_implementation, merge_lora=merge_lora)
        return cls(model, FeatureExtractor(feature_config(model.config.features, feature_overrides), device=device),
                   **options)

    @property
    def device(self):
        return self.model.vlm.get_input_embeddings().weight.device

    @torch.no_grad()
    def score_features(self, features: list[dict]) -> list[dict]:
        """The rater's predictions, each with the video's `info` and `flags` (see common.video_flags)."""
        from .features import model_inputs

        batch = model_inputs(features, self.extractor.preparer.spatial, self.device, self.model.vision_dtype)
        return [{**prediction, "flags": video_flags(f["info"]), "info": f["info"]}
                for prediction, f in zip(self.model.predict(**batch), features)]

    def score_frames(self, videos) -> list[dict]:
        """In-memory videos, each uint8 frames [T,H,W,3] (an image is T=1), scored in one batch."""
        prepared = [self.extractor.preparer.from_frames(frames) for frames in videos]
        return self.score_features(self.extractor.finish(prepared))

    def results(self, items: list[Extracted]) -> list[dict]:
        """The result of each extracted video (its failure for one that could not be read), in one batch."""
        good = [item for item in items if item.features is not None]
        predictions = iter(self.score_features([item.features for item in good]) if good else [])
        return [{"path": item.path, **(next(predictions) if item.features is not None else {"error": item.error}),
                 "content": item.content, "scorer": self.fingerprint} for item in items]

    def score(self, paths, output=None, progress: bool = True, on_batch=None) -> list[dict]:
        """One result per path: {path, score, level, text, flags, info, ...} or {path, error}.

        With `output` (a .jsonl file), results are appended as they come and paths already in
        the file are not scored again, so an interrupted run resumes where it stopped.
        `on_batch(n)` is called after each batch of n videos (a caller's own progress bar).
        """
        paths = [str(p) for p in paths]
        done = self._still_valid(read_results(output), paths, output) if output else {}
        todo = [p for p in dict.fromkeys(paths) if p not in done]
        self.resumed = len(done)
        if done:
            log.info("resuming: %d of %d videos already scored in %s", len(done), len(paths), output)
        sink = open_for_appending(output) if output else None
        try:
            for results in self.batches(todo, progress):
                for result in results:
                    done[result["path"]] = result
                    if sink:
                        sink.write(json.dumps(result) + "\n")
                if sink:
                    sink.flush()
                if on_batch:
                    on_batch(len(results))
        finally:
            if sink:
                sink.close()
        return [done[p] for p in paths]

    def batches(self, paths, progress: bool = True) -> Iterator[list[dict]]:
        """The results of `paths`, a batch at a time and in their order, while the next videos are prepared."""
        for items in extract_features([str(p) for p in paths], self.extractor, self.cache_dir, self.batch_size,
                                      self.workers, progress, self.timeout_per_video, self.threads):
            yield self.results(items)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What a score depends on besides the video: the rater's configuration, base and trained
        weights (heads, projectors, LoRA), the feature settings and the code versions."""
        from . import __version__
        from .checkpoint import base_identity, trained_digest

        # Nothing here depends on where the checkpoint lies: a moved checkpoint resumes its results file.
        model = self.model
        described = {"model": {k: v for k, v in model.config.to_dict().items() if k != "features"},
                     "base": base_identity(model.base_path), "lora_merged": model.lora_merged,
                     "trained": model.trained_digest or trained_digest(model),
                     "features": self.extractor.key_digest(), "fvq_plugin": __version__}
        return hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()

    def _still_valid(self, previous: dict, paths, output) -> dict:
        """The results in `output` that hold for this run: the same scorer, and files whose bytes are unchanged."""
        if not previous:
            return {}
        if {r.get("scorer") for r in previous.values()} != {self.fingerprint}:
            raise ResultsFileError(f"{output} holds results of another checkpoint, other settings or another "
                                   "fvq-plugin version; resume only with the same ones, or write to a new output file")
        valid = {}
        for path in dict.fromkeys(paths):
            result = previous.get(path)
            try:
                if result is not None and result.get("content") == FeatureCache.content_key(path):
                    valid[path] = result
            except OSError:
                pass  # scored again, and its error recorded
        return valid


def read_results(output) -> dict:
    """The last result per path in a JSONL results file; lines that are not results are skipped with a warning."""
    path = Path(output)
    if not path.is_file():
        return {}
    results, skipped = {}, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            # the last line of a killed run may be cut short; that video is scored again
            skipped += line.strip() != ""
            continue
        if not isinstance(result, dict) or not isinstance(result.get("path"), str):
            skipped += 1
            continue
        results[result["path"]] = result
    if skipped:
        log.warning("%s: skipped %d line(s) that are not results", output, skipped)
    return results


def split_features(root, split: str, extractor: FeatureExtractor, cache_dir=None, batch_size: int = 8,
                   workers: int = 0, progress: bool = True, threads: int = 0):
    """Features and MOS of every readable video of a dataset split, plus the failures."""
    from .data import read_split

    records = read_split(root, split)
    features, mos, failures = [], [], []
    batches = extract_features([r.path for r in records], extractor, cache_dir, batch_size, workers, progress,
                               threads=threads)
    items = (item for batch in batches for item in batch)
    for record, item in zip(records, items):
        if item.features is None:
            failures.append({"path": item.path, "error": item.error})
        else:
            features.append(item.features)
            mos.append(record.mos)
    for failure in failures:
        log.warning("skipped %s: %s", failure["path"], failure["error"])
    return features, mos, failures


def evaluate(scorer: Scorer, root, split: str = "test", output=None, progress: bool = True) -> tuple[dict, list]:
    """SRCC/PLCC/KRCC/RMSE of the scorer on a split, with the counts of scored and failed videos."""
    from .data import read_split
    from .metrics import correlation_report

    records = read_split(root, split)
    results = scorer.score([r.path for r in records], output=output, progress=progress)
    for record, result in zip(records, results):
        result["mos"] = record.mos
    scored = [r for r in results if "score" in r]
    report = correlation_report([r["score"] for r in scored], [r["mos"] for r in scored])
    report.update(scored=len(scored), failed=len(results) - len(scored), split=split)
    return report, results


CSV_FIELDS = ("path", "score", "level", "flags", "mos", "error")


def write_csv(results: list[dict], path) -> None:
    """One row per video: path, score, level, flags (;-separated), MOS (when known) and the error of a failed video."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "flags": ";".join(r.get("flags", ()))} for r in results)
    write_atomically(path, text.getvalue())
