"""`fvq-rater compare`: FVQ-Rater and other quality metrics on the same videos, with the same statistics.

Metrics: `fvq_rater` (the Scorer), its distilled student `fvq_rater_lite` (the LiteScorer), any no-reference
pyiqa metric by name (run on the sampled frames of each video, pooled per video; NIQE with parameters
shipped in a wheel, see classic.py), the no-reference video metric `viideo`, and other LMMs' logged fvq20k
answers (`--lmms-eval-samples`), parsed as the task parses them. Each computed metric runs in its own worker process: its peak
memory is its own, and one that crashes or cannot load costs that metric only, which is reported
as "unavailable: reason". Every SRCC reads the same way: a lower-is-better metric is negated first.

Per-video predictions are appended to OUT/predictions/METRIC-SETTINGS.jsonl as they come, keyed by
the video's content: a rerun with --resume computes only what is missing, so adding a metric to a
finished comparison scores that metric alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .common import LITE_WEIGHTS_ENV, file_digest, forkserver_context, open_for_appending, write_atomically
from .errors import InputError

FVQ, LITE = "fvq_rater", "fvq_rater_lite"
# What every metric's worker starts with, imported once by the server it is forked from (a few seconds per metric
# otherwise); they count in each worker's peak memory.
WORKER_PRELOAD = ("fvq_plugin.scoring", "pyiqa")
RATERS = (FVQ, LITE)  # scored through their Scorer, from a checkpoint folder
STATISTICS = ("srcc", "plcc", "krcc", "rmse")
PREDICTIONS_DIR = "predictions"
COLUMNS = ("metric", "status", "srcc", "plcc", "krcc", "rmse", "seconds_per_video", "peak_mb", "scored", "failed",
           "lower_better", "reason")


class Unavailable(Exception):
    """A metric that cannot run here (no weights offline, a full-reference metric, ...)."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric to compute and what its predictions depend on."""

    name: str
    weights: str | None = None      # local weights or parameter file (pyiqa's pretrained_model_path; a rater's checkpoint)
    frames: int = 8                 # frames per video for frame metrics
    pool: str = "mean"
    device: str = "cpu"

    def settings(self) -> dict:
        from .classic import VIDEO_METRICS, VIIDEO_FRAMES, shipped_parameters

        settings = {"name": self.name, "weights": _identity(self.weights or shipped_parameters(self.name))}
        if self.name in VIDEO_METRICS:
            settings.update(frames=VIIDEO_FRAMES)
        elif self.name not in RATERS:  # the raters sample frames as their checkpoints say
            settings.update(frames=self.frames, pool=self.pool)
        return settings

    def file_name(self) -> str:
        digest = hashlib.blake2b(json.dumps(self.settings(), sort_keys=True).encode(), digest_size=6).hexdigest()
        return f"{self.name}-{digest}.jsonl"


def _identity(path) -> list | None:
    """What a weights file or folder holds, independent of where it lies: (name, size, digest) of each
    file, hashing only files under 256 MB (a large backbone is named by its size)."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size,
             file_digest(f, "blake2b")[:16] if f.stat().st_size < 256 << 20 else None] for f in files]


# --- computing one metric (in its own process) ---------------------------------------------------

def _frame_metric(spec: MetricSpec):
    """A pyiqa no-reference metric as a function of one video's path -> pooled score, and its direction."""
    import pyiqa
    import torch

    from .classic import pyiqa_weights
    from .video import sample_frames

    weights = pyiqa_weights(spec.name, spec.weights)
    try:
        metric = pyiqa.create_metric(spec.name, device=spec.device,
                                     **({"pretrained_model_path": weights} if weights is not None else {}))
    except Exception as error:  # pyiqa raises whatever its download or its arch raises
        hint = "" if spec.weights else f" (no download here: give local weights with --metric-weights {spec.name}=PATH)"
        raise Unavailable(_first_line(error)[:200] + hint) from None
    lower_better = bool(metric.lower_better)
    worst = np.max if lower_better else np.min

    def score(path) -> float:
        frames = sample_frames(path, spec.frames, sampling="centres").frames
        with torch.no_grad():
            values = metric(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).flatten().cpu().numpy()
        return float({"mean": np.mean, "median": np.median, "min": worst}[spec.pool](values))  # cli.COMPARE_POOLS

    return score, lower_better


def _video_metric(spec: MetricSpec):
    """VIIDEO (see classic.py) on the first consecutive frames of a video, as luma; higher is better."""
    import cv2

    from .classic import VIIDEO_FRAMES, viideo_score
    from .video import all_frames

    def score(path) -> float:
        frames = all_frames(path, first=VIIDEO_FRAMES).frames
        return viideo_score(np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]))

    return score, False


def _finite(prediction, error) -> tuple:
    """(prediction, error) with a NaN or infinite prediction turned into an error."""
    if error is None and not math.isfinite(prediction):
        return None, f"the metric gave {prediction}"
    return prediction, error


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def compute_metric(spec: MetricSpec, todo: list[tuple[str, str]], file: str, batch_size: int = 8, cache_dir=None,
                   progress: bool = True, threads: int = 0) -> dict:
    """Predictions of one metric for (path, content) pairs, appended to `file` as they come; runs in a
    worker process. Returns the metric's direction and this process's peak memory."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints (pyiqa's "Downloading: ...") stay off stdout
        return _compute_metric(spec, todo, file, batch_size, cache_dir, progress, threads)


def _compute_metric(spec, todo, file, batch_size, cache_dir, progress, threads) -> dict:
    import resource

    from tqdm.auto import tqdm

    paths = [path for path, _ in todo]
    if spec.name in RATERS:
        from .lite import LiteScorer
        from .scoring import Scorer

        scorer = (LiteScorer if spec.name == LITE else Scorer).from_pretrained(
            spec.weights, device=spec.device, batch_size=batch_size, cache_dir=cache_dir, threads=threads)
        lower_better = False
        # Batches stream out while the next videos are prepared (in `threads`), as `score` runs them.
        outcomes = ([_finite(r.get("score"), r.get("error")) for r in results]
                    for results in scorer.batches(paths, progress=False))
    else:
        from .classic import VIDEO_METRICS

        score, lower_better = (_video_metric if spec.name in VIDEO_METRICS else _frame_metric)(spec)
        outcomes = ([_outcome(score, path)] for path in paths)

    with open_for_appending(file) as sink, \
            tqdm(total=len(todo), desc=spec.name, unit="video", disable=not progress) as bar:
        done = 0
        while done < len(todo):
            started = time.perf_counter()
            batch = next(outcomes)
            seconds = (time.perf_counter() - started) / len(batch)
            for (path, content), (prediction, error) in zip(todo[done:done + len(batch)], batch):
                # The run's first batch carries its lazy loads (models, kernels): not a per-video cost.
                line = {"content": content, "path": path, "seconds": seconds, "first": done == 0}
                line.update({"pred": prediction} if error is None else {"error": error})
                sink.write(json.dumps(line) + "\n")
            sink.flush()
            done += len(batch)
            bar.update(len(batch))
    return {"lower_better": lower_better, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _outcome(score, path) -> tuple:
    """(prediction, None) or (None, error) of a metric scoring one video: one video must not end the metric."""
    from .video import VideoReadError

    try:
        value = score(path)
    except VideoReadError as failure:
        return None, failure.reason
    except Exception as failure:
        return None, _first_line(failure)
    return _finite(value, None)


def _in_worker(function, *args, **kwargs):
    """`function(*args, **kwargs)` in a fresh forkserver process (see the module docstring)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=forkserver_context(*WORKER_PRELOAD)) as pool:
        try:
            return pool.submit(function, *args, **kwargs).result()
        except BrokenProcessPool:
            raise Unavailable("its worker process died (out of memory?)") from None
        except Unavailable:
            raise
        except Exception as error:  # it failed to load or run: this metric only
            raise Unavailable(_first_line(error)[:300]) from None


def _check_runnable(spec: MetricSpec) -> None:
    """Unavailable before a worker starts: FVQ-Rater without weights, a metric that needs a reference."""
    from .classic import VIDEO_METRICS

    if spec.name == FVQ:
        if spec.weights is None:
            raise Unavailable("no FVQ-Rater weights: pass --weights DIR or set FVQ_RATER_WEIGHTS")
    elif spec.name == LITE:
        if spec.weights is None:
            raise Unavailable(f"no student weights: pass --metric-weights {LITE}=DIR (distill's OUT/student) or set "
                              f"{LITE_WEIGHTS_ENV}")
    elif spec.name not in VIDEO_METRICS:
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        mode = DEFAULT_CONFIGS[spec.name].get("metric_mode")
        if mode != "NR":
            raise Unavailable(f"a {mode or 'non-NR'} metric needs a reference video, and compare has none")


def check_metric_names(names) -> None:
    """Every name is a rater, viideo or a pyiqa metric; a typo is named with the closest ones, before any work."""
    import difflib

    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    from .classic import VIDEO_METRICS

    known = [*RATERS, *VIDEO_METRICS, *DEFAULT_CONFIGS]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise InputError(f"unknown metric {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                           "; `python -c 'import pyiqa; print(pyiqa.list_models())'` "
                                                           "lists pyiqa's"))


# --- the comparison -------------------------------------------------------------------------------

@dataclass
class Row:
    metric: str
    status: str = "ok"
    reason: str = ""
    lower_better: bool = False
    pairs: list = field(default_factory=list)   # (prediction, MOS) of each scored video of the split
    failed: int = 0
    seconds_per_video: float = math.nan
    peak_mb: float = math.nan
    statistics: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The row as JSON/CSV hold it: an undefined number (NaN) is None."""
        numbers = {**dict.fromkeys(STATISTICS, math.nan), **self.statistics,
                   "seconds_per_video": self.seconds_per_video, "peak_mb": self.peak_mb}
        numbers = {k: None if math.isnan(v) else float(v) for k, v in numbers.items()}
        return {"metric": self.metric, "status": self.status, **numbers, "scored": len(self.pairs),
                "failed": self.failed, "lower_better": self.lower_better, "reason": self.reason}


def read_predictions(file: Path) -> tuple[dict, list]:
    """(content -> prediction, seconds per video of every line, failures included) from a predictions file;
    the lines of each run's first chunk are left out of the seconds unless there are no others."""
    predictions, seconds, first_seconds = {}, [], []
    if not file.is_file():
        return predictions, seconds
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            content, taken = entry["content"], float(entry["seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a killed run: that video is computed again
        (first_seconds if entry.get("first") else seconds).append(taken)
        if "pred" in entry:
            predictions[content] = entry["pred"]
    return predictions, seconds or first_seconds


def lmms_eval_predictions(file) -> dict:
    """Video name (its path below the split's videos/ folder) -> score, from the samples lmms-eval logs for
    fvq20k or fvq20k_generic (`--log_samples`); None for a failed or unparsed answer.

    The task's own parsed score (`srcc.pred`, unrounded for fvq_rater) is used; the logged answer text is
    parsed the same way only when it is missing.
    """
    from .answers import parse_answer
    from .data import VIDEOS_DIR

    out = {}
    for number, line in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
            video = sample["srcc"]
            score = video["pred"] if "pred" in video else parse_answer(sample["filtered_resps"])[0]
            name = video["path"].replace("\\", "/").rpartition(f"/{VIDEOS_DIR}/")[2]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"{file}:{number}: not a logged fvq20k sample ({_first_line(error)})") from None
        out[name] = score
    return out


def _statistics(row: Row) -> None:
    from .metrics import krcc, plcc, rmse, srcc

    if len(row.pairs) < 3:
        return
    sign = -1.0 if row.lower_better else 1.0
    pred = [sign * prediction for prediction, _ in row.pairs]
    mos = [value for _, value in row.pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined correlations are NaN in the table
        row.statistics = {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos, fit=True), "krcc": krcc(pred, mos),
                          "rmse": rmse(pred, mos, fit=True)}


def compare(root, split: str, specs: list[MetricSpec], out, lmms_samples: dict | None = None, resume: bool = False,
            batch_size: int = 8, cache_dir=None, progress: bool = True, threads: int = 0) -> dict:
    """Every metric on the split's videos: rows of statistics and costs, written to OUT as CSV, JSON and PNG.

    `lmms_samples` maps column names to logged lmms-eval samples files; `cache_dir` is FVQ-Rater's feature cache;
    `threads` prepare the raters' videos ahead of their models (`Scorer`'s threads).
    """
    from .data import read_split
    from .scoring import FeatureCache

    out = Path(out)
    if (out / "compare.json").exists() and not resume:
        raise InputError(f"{out} holds a comparison already: add --resume to reuse its predictions (and compute "
                         "only the missing ones), or choose another --out")
    (out / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
    records = read_split(root, split)
    videos = []
    for record in records:
        try:
            videos.append((str(record.path), FeatureCache.content_key(record.path), record))
        except OSError:
            continue  # unreadable: a failure of every metric
    # Samples files are read before any metric runs: a bad one is said at once, not after hours of scoring.
    logged = {label: lmms_eval_predictions(file) for label, file in (lmms_samples or {}).items()}

    rows = []
    for spec in specs:
        row = Row(spec.name)
        file = out / PREDICTIONS_DIR / spec.file_name()
        run_file = file.with_suffix(".run.json")
        done, _ = read_predictions(file)
        # A video that failed before is tried again: its failure may have been this machine's (memory, an install).
        todo = list(dict.fromkeys((path, content) for path, content, _ in videos if content not in done))
        try:
            _check_runnable(spec)
            if todo:
                run = _in_worker(compute_metric, spec, todo, str(file), batch_size=batch_size, cache_dir=cache_dir,
                                 progress=progress, threads=threads)
                previous = json.loads(run_file.read_text()) if run_file.is_file() else {}
                run["peak_mb"] = max(run["peak_mb"], previous.get("peak_mb", 0))
                write_atomically(run_file, json.dumps(run))
            elif not run_file.is_file():
                raise Unavailable("no predictions and no record of a run")
            run = json.loads(run_file.read_text())
        except Unavailable as reason:
            row.status, row.reason = "unavailable", str(reason)
            rows.append(row)
            continue
        done, seconds = read_predictions(file)
        row.lower_better, row.peak_mb = run["lower_better"], run["peak_mb"]
        # Per record, so byte-identical videos count as often as the split lists them (as `eval` counts them).
        row.pairs = [(done[content], record.mos) for _, content, record in videos if content in done]
        row.failed = len(records) - len(row.pairs)
        row.seconds_per_video = float(np.mean(seconds)) if seconds else math.nan
        _statistics(row)
        rows.append(row)

    for label, by_name in logged.items():
        row = Row(label, reason=f"logged answers: {lmms_samples[label]}")
        names = [Path(os.path.normpath(record.name)).as_posix() for record in records]  # as the task logs them
        if not set(names) & set(by_name):
            row.status, row.reason = "unavailable", f"{lmms_samples[label]} logs none of this split's videos"
        row.pairs = [(by_name[name], record.mos) for name, record in zip(names, records) if by_name.get(name) is not None]
        row.failed = len(records) - len(row.pairs)
        _statistics(row)
        rows.append(row)

    result = {"data": str(root), "split": split, "videos": len(records),
              "settings": [asdict(spec) for spec in specs], "rows": [row.record() for row in rows]}
    write_atomically(out / "compare.json", json.dumps(result, indent=2))
    write_csv(result["rows"], out / "compare.csv")
    plot(rows, out / "compare.png", title=f"{Path(root).name} / {split}: {len(records)} videos")
    return result


def write_csv(rows: list[dict], path) -> None:
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, text.getvalue())


def format_table(rows: list[dict]) -> str:
    """The comparison as a markdown table, best SRCC first, unavailable metrics last."""
    def number(value, form):
        return "" if value is None else form.format(value)

    lines = ["| metric | SRCC | PLCC | KRCC | RMSE | s/video | peak MB | scored | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def rank(row):
        return row["status"] != "ok", -row["srcc"] if row["srcc"] is not None else math.inf

    order = sorted(rows, key=rank)
    for r in order:
        if r["status"] != "ok":
            lines.append(f"| {r['metric']} | unavailable: {r['reason']} | | | | | | | |")
            continue
        name = r["metric"] + (" (lower is better)" if r["lower_better"] else "")
        lines.append(f"| {name} | {number(r['srcc'], '{:.4f}')} | {number(r['plcc'], '{:.4f}')} | "
                     f"{number(r['krcc'], '{:.4f}')} | {number(r['rmse'], '{:.3f}')} | "
                     f"{number(r['seconds_per_video'], '{:.3f}')} | {number(r['peak_mb'], '{:.0f}')} | "
                     f"{r['scored']} | {r['failed']} |")
    return "\n".join(lines)


def plot(rows: list[Row], path, title: str) -> None:
    """One scatter panel per metric: prediction against MOS, the fitted logistic curve, SRCC in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import LOGISTIC_PARAMETERS, logistic_fit

    shown = [row for row in rows if row.status == "ok" and len(row.pairs) >= 3]
    columns = min(3, max(1, len(shown)))
    lines = max(1, math.ceil(len(shown) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.8 * lines), squeeze=False)
    for axis in axes.flat[len(shown):]:
        axis.axis("off")
    for axis, row in zip(axes.flat, shown):
        pred, mos = np.array(row.pairs, dtype=float).T
        axis.scatter(pred, mos, s=14, alpha=0.7, edgecolors="none")
        if len(pred) > LOGISTIC_PARAMETERS:  # with fewer points logistic_fit returns the predictions unmapped
            order = np.argsort(pred)
            sign = -1.0 if row.lower_better else 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fitted = logistic_fit(sign * pred, mos)
            axis.plot(pred[order], np.asarray(fitted)[order], color="tab:red", linewidth=1.5, label="logistic fit")
        srcc = row.statistics.get("srcc", math.nan)
        axis.set_title(f"{row.metric}   SRCC {srcc:.3f}", fontsize=11)
        axis.set_xlabel(f"{row.metric} score" + (" (lower is better)" if row.lower_better else ""))
        axis.set_ylabel("MOS")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    partial = f"{os.fspath(path)}.partial.png"
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    os.replace(partial, path)
