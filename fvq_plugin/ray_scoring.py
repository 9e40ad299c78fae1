"""Scoring on a Ray cluster: the local Scorer's steps as a Ray Data pipeline.

Videos stream through two actor pools. Preparation actors (one CPU each) fetch a video, hash it,
look it up in the feature cache and otherwise decode it and run the CPU feature models (faces,
portraits), exactly as `scoring.prepare_video` does locally. Rating actors load the checkpoint once
and do what one batch of `Scorer.score` does: SlowFast, the cache write, the rater. The driver
collects the results into parquet parts (each written whole, then renamed, and never rewritten);
`resume` skips the videos already in the parts. A killed worker is restarted by Ray and its task
retried; a video that fails is a row with its error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from .common import LEVELS, write_atomically
from .errors import InputError
from .scoring import Extracted, FeatureCache, ResultsFileError, finish_features, prepare_video

log = logging.getLogger(__name__)

INSTALL_HINT = 'the Ray engine needs Ray Data: pip install "fvq-plugin[ray]"'
RESULTS_JSONL = "results.jsonl"
PART_GLOB = "part-*.parquet"
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
LOST = "lost: the Ray task that held this video failed {} times (a worker crash or out of memory?); --resume tries again"


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise InputError(INSTALL_HINT) from error
    return ray


# ----- input ------------------------------------------------------------------------------------


def _filesystem(uri: str):
    """fsspec's filesystem and path for a URI (or a local path)."""
    import fsspec.core

    return fsspec.core.url_to_fs(uri)


def read_manifest(source) -> list[str]:
    """The video paths or URIs of a manifest: .txt (one per line, # comments), .csv or .parquet (the `path`
    column, else the first), on any filesystem fsspec opens (s3://, gs://, hdfs://, file://, a local path)."""
    import pyarrow.csv
    import pyarrow.parquet

    source = str(source)
    suffix = Path(source.split("?")[0]).suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InputError(f"manifest {source}: give a .txt (one path per line), .csv or .parquet file")
    filesystem, path = _filesystem(source)
    try:
        with filesystem.open(path, "rb") as handle:
            if suffix == ".txt":
                lines = handle.read().decode("utf-8").splitlines()
                return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            table = pyarrow.csv.read_csv(handle) if suffix == ".csv" else pyarrow.parquet.read_table(handle)
    except FileNotFoundError as error:
        raise InputError(f"manifest {source}: no such file") from error
    except (OSError, UnicodeDecodeError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"manifest {source}: not a readable {suffix[1:]} file ({error})") from error
    if table.num_columns == 0:
        raise InputError(f"manifest {source}: no columns")
    column = table.column("path" if "path" in table.column_names else 0)
    return [str(p) for p in column.to_pylist() if p not in (None, "")]


@contextlib.contextmanager
def local_copy(uri: str):
    """A local file to decode: the path itself, or a temporary copy of a remote URI (deleted afterwards)."""
    if "://" not in uri:
        yield uri
        return
    filesystem, path = _filesystem(uri)
    if "file" in (filesystem.protocol if isinstance(filesystem.protocol, tuple) else (filesystem.protocol,)):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fvq-ray-") as folder:
        local = Path(folder) / Path(path).name
        filesystem.get_file(path, str(local))
        yield str(local)


# ----- the two stages -------------------------------------------------------------------------


def _pack(features: dict) -> bytes:
    from safetensors.torch import save

    return save({name: value.contiguous() for name, value in features.items() if name != "info"})


def _unpack(data: bytes, info: str) -> dict:
    from safetensors.torch import load

    return {**load(data), "info": json.loads(info)}


class _Prepare:
    """Preparation actor: the CPU half of the local pipeline, one video at a time."""

    def __init__(self, make_extractor: Callable, cache_dir=None):
        from .scoring import _one_thread_per_worker

        _one_thread_per_worker()
        extractor = make_extractor()
        self.preparer = extractor.preparer
        self.cache = FeatureCache(cache_dir, extractor.key_digest()) if cache_dir else None
        # the extractor's device model (SlowFast) is not kept: it runs in the rating actors

    def __call__(self, batch: dict):
        rows = []
        for path, previous in zip(batch["path"], batch["previous"]):
            path = str(path)
            try:
                with local_copy(path) as local:
                    if previous and _content_key(local) == previous:
                        rows.append({"path": path, "unchanged": True})
                        continue
                    item = prepare_video(path, self.preparer, self.cache, read_as=local)
            except Exception as error:  # the URI could not be fetched (prepare_video itself never raises)
                item = Extracted(path, None, f"cannot fetch {path}: {type(error).__name__}: {error}")
            rows.append({"path": path, "content": item.content, "error": item.error, "cached": item.cached,
                         "features": _pack(item.features) if item.features is not None else None,
                         "info": json.dumps(item.features["info"]) if item.features is not None else None})
        return _prepared_table(rows)


def _content_key(path) -> str | None:
    try:
        return FeatureCache.content_key(path)
    except OSError:
        return None  # prepare_video records why


def _prepared_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("content", pa.string()), ("error", pa.string()), ("cached", pa.bool_()),
                        ("features", pa.binary()), ("info", pa.string()), ("unchanged", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


class _Rate:
    """Rating actor: the checkpoint loaded once; each batch as one batch of `Scorer.score`."""

    def __init__(self, make_scorer: Callable, cache_dir=None):
        self.scorer = make_scorer()
        self.cache = FeatureCache(cache_dir, self.scorer.extractor.key_digest()) if cache_dir else None

    def __call__(self, table):
        rows = table.to_pylist()
        items = [Extracted(r["path"], _unpack(r["features"], r["info"]) if r["features"] is not None else None,
                           r["error"], bool(r["cached"]), r["content"]) for r in rows if not r["unchanged"]]
        finish_features(items, self.scorer.extractor, self.cache)
        results = self.scorer.results(items)
        # a resumed row carries this scorer's fingerprint too: the driver refuses results of another one
        results += [{"path": r["path"], "unchanged": True, "scorer": self.scorer.fingerprint}
                    for r in rows if r["unchanged"]]
        return results_table(results)


# ----- results ----------------------------------------------------------------------------------


def _schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("content", pa.string()), ("score", pa.float64()),
                      ("level", pa.string()), ("level_probs", pa.struct([(level, pa.float64()) for level in LEVELS])),
                      ("text", pa.string()), ("flags", pa.list_(pa.string())), ("info", pa.string()),
                      ("error", pa.string()), ("scorer", pa.string()), ("retry", pa.bool_()),
                      ("unchanged", pa.bool_())])


def results_table(results: list[dict]):
    """Results as the Scorer returns them -> one Arrow row each (info as JSON text)."""
    import pyarrow as pa

    schema = _schema()
    rows = [{**r, "info": json.dumps(r["info"]) if "info" in r else None} for r in results]
    return pa.Table.from_pylist(rows, schema=schema)


def results_of(table) -> list[dict]:
    """Arrow rows -> results as the Scorer returns them (absent fields left out)."""
    results = []
    for row in table.to_pylist():
        result = {k: v for k, v in row.items() if v is not None and k not in ("unchanged", "retry")}
        if "info" in result:
            result["info"] = json.loads(result["info"])
        if row.get("retry"):
            result["retry"] = True
        results.append(result)
    return results


def read_parts(out) -> list:
    """The result tables of an output folder, in the order they were written."""
    import pyarrow.parquet

    return [pyarrow.parquet.read_table(part) for part in sorted(Path(out).glob(PART_GLOB))]


def read_output(out) -> dict:
    """The last result per path in an output folder (as `scoring.read_results` reads a JSONL file)."""
    return {result["path"]: result for table in read_parts(out) for result in results_of(table)}


class _Parts:
    """Result rows into parquet parts numbered after those already in `out` (no part is ever overwritten).
    A part is written when it holds `rows` results or `seconds` have passed since the last one: a crash
    loses at most that much work, and a million videos make a few thousand files, not one per batch."""

    def __init__(self, out: Path, rows: int = 512, seconds: float = 60):
        self.out, self.rows, self.seconds = out, rows, seconds
        numbers = [int(match.group(1)) for part in out.glob(PART_GLOB)
                   if (match := re.fullmatch(r"part-(\d+)\.parquet", part.name))]
        self.number = max(numbers, default=-1) + 1
        self.pending, self.last = [], time.monotonic()

    def add(self, table) -> None:
        self.pending.append(table.drop_columns(["unchanged"]))  # a driver's note, not a result
        if sum(t.num_rows for t in self.pending) >= self.rows or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet

        if not self.pending:
            return
        handle, temporary = tempfile.mkstemp(dir=self.out, suffix=".tmp")
        os.close(handle)
        try:
            pyarrow.parquet.write_table(pa.concat_tables(self.pending), temporary)
            os.replace(temporary, self.out / f"part-{self.number:06d}.parquet")  # there whole, or not at all
        finally:
            Path(temporary).unlink(missing_ok=True)
        self.number, self.pending, self.last = self.number + 1, [], time.monotonic()


# ----- the driver -------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray_session(address, progress: bool):
    """Ray as the caller left it: a running session is used as is; else one is started (or joined) and shut down."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=progress)
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.max_errored_blocks
    context.enable_progress_bars = progress
    context.max_errored_blocks = -1  # a batch given up after its retries becomes rows that say so (LOST)
    try:
        yield ray
    finally:
        context.enable_progress_bars, context.max_errored_blocks = saved
        if started:
            ray.shutdown()


def score_on_ray(paths, out, make_extractor: Callable, make_scorer: Callable, *, cache_dir=None, batch_size: int = 8,
                 prepare_batch_size: int = 4, prepare_actors: int | None = None, rate_actors: int = 1,
                 gpus_per_rater: float = 0, cpus_per_rater: float = 1, task_retries: int = 3, part_rows: int = 512,
                 resume: bool = False, address=None, progress: bool = True) -> dict:
    """Score `paths` (local paths or URIs) into the folder `out`: parquet parts and, at the end, results.jsonl.

    make_extractor() builds the feature extractor on a preparation actor, make_scorer() the Scorer on a
    rating actor; each is called once per actor and must pickle (module-level functions, functools.partial).
    prepare_actors defaults to the cluster's CPUs less the raters'. A task whose worker died more than
    task_retries times is given up: its videos become rows with `retry` set, which `resume` scores again.
    A part is written every `part_rows` results (or every minute).
    Returns a summary: videos, scored, failed (lost included), resumed, lost, seconds, videos_per_second.
    """
    out = Path(out)
    if out.is_file():
        raise InputError(f"{out} is a file; the Ray engine writes a folder of parquet parts")
    existing = sorted(out.glob(PART_GLOB)) if out.is_dir() else []
    if existing and not resume:
        raise InputError(f"{out} already holds results; continue them with --resume, or choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    previous = read_output(out) if existing else {}
    scorers = {r["scorer"] for r in previous.values() if "scorer" in r}
    if len(scorers) > 1:
        raise ResultsFileError(f"{out} holds results of several scorers; write to a new folder")
    paths = list(dict.fromkeys(str(p) for p in paths))
    todo = [{"path": p, "previous": _reusable_content(previous.get(p))} for p in paths]
    summary = {"videos": len(paths), "scored": 0, "failed": 0, "resumed": 0, "lost": 0}
    start = time.perf_counter()
    if paths:
        with _ray_session(address, progress) as ray:
            cpus = ray.cluster_resources().get("CPU", 2)
            options = {"cache_dir": cache_dir, "batch_size": batch_size, "prepare_batch_size": prepare_batch_size,
                       "prepare_actors": prepare_actors or max(1, int(cpus - rate_actors * cpus_per_rater)),
                       "rate_actors": rate_actors, "gpus_per_rater": gpus_per_rater, "cpus_per_rater": cpus_per_rater,
                       "task_retries": task_retries}
            parts = _Parts(out, part_rows)
            try:
                seen = _run_pipeline(ray, todo, parts, make_extractor, make_scorer, options, next(iter(scorers), None),
                                     summary)
            finally:
                parts.flush()  # what was scored before an error or ^C is kept
        lost = [p for p in paths if p not in seen]
        if lost:
            parts.add(results_table([{"path": p, "error": LOST.format(task_retries + 1), "retry": True} for p in lost]))
            parts.flush()
        summary["lost"] = len(lost)
        summary["failed"] += len(lost)
    summary["seconds"] = time.perf_counter() - start
    summary["videos_per_second"] = (summary["scored"] + summary["failed"] - summary["lost"]) / summary["seconds"]
    final = read_output(out)
    write_atomically(out / RESULTS_JSONL, "".join(json.dumps(final[p]) + "\n" for p in paths if p in final))
    return summary


def _reusable_content(result: dict | None) -> str:
    """The content hash under which a previous result still holds ("" to score the video again)."""
    if result is None or result.get("retry"):
        return ""
    return result.get("content") or ""


def _run_pipeline(ray, todo, parts: _Parts, make_extractor, make_scorer, options: dict, expected_scorer,
                  summary) -> set:
    import warnings

    from ray.data import ActorPoolStrategy

    # Ray's actor pools restart dead actors and retry their tasks without end by default; a video that
    # crashes its worker every time would then stall the run. Bounding the retries takes the remote
    # arguments map_batches deprecates for 2.64 (hence the pin below it in setup.cfg).
    retries = {"max_restarts": -1, "max_task_retries": options["task_retries"]}
    dataset = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / options["prepare_batch_size"])))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        dataset = dataset.map_batches(
            _Prepare, fn_constructor_kwargs={"make_extractor": make_extractor, "cache_dir": options["cache_dir"]},
            batch_size=options["prepare_batch_size"], batch_format="numpy",
            # One task at a time per actor: a worker's death then fails only the task it was running,
            # not the ones queued behind it (which would use up their retries with the culprit's).
            compute=ActorPoolStrategy(size=options["prepare_actors"], max_tasks_in_flight_per_actor=1), num_cpus=1,
            **retries)
        dataset = dataset.map_batches(
            _Rate, fn_constructor_kwargs={"make_scorer": make_scorer, "cache_dir": options["cache_dir"]},
            batch_size=options["batch_size"], batch_format="pyarrow", compute=ActorPoolStrategy(size=options["rate_actors"]),
            num_cpus=options["cpus_per_rater"], num_gpus=options["gpus_per_rater"] or None, **retries)
    seen = set()
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        seen.update(table.column("path").to_pylist())
        unchanged = table.column("unchanged").to_pylist()
        summary["resumed"] += sum(bool(u) for u in unchanged)
        if expected_scorer and set(table.column("scorer").drop_null().to_pylist()) - {expected_scorer}:
            raise ResultsFileError(f"{parts.out} holds results of another checkpoint, other settings or another fvq-plugin "
                                   "version; resume only with the same ones, or write to a new folder")
        table = table.filter([not u for u in unchanged])
        if table.num_rows:
            parts.add(table)
            scored = table.column("error").null_count
            summary["scored"] += scored
            summary["failed"] += table.num_rows - scored
    return seen


def format_summary(summary: dict, out) -> str:
    line = (f"{summary['scored']} scored, {summary['failed']} failed, {summary['resumed']} resumed; "
            f"{summary['videos_per_second']:.2f} videos/s; results in {Path(out) / RESULTS_JSONL} and {out}/{PART_GLOB}")
    return line + (f"\n{summary['lost']} lost to failed Ray tasks: --resume tries them again" if summary["lost"] else "")

