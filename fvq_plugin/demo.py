"""The main job on the embedded default: train a tiny FVQ-Rater on CPU and score the demo set.

Real FVQ-Rater weights and FVQ-20K cannot be downloaded here, so the demo builds a degraded
face-video set from package-shipped photos, trains a tiny InternVL (same code path as the 8B model;
random but for a vision tower pretrained on face-free pictures, as InternViT is pretrained) with all
four streams through stage I and stage II, and evaluates the best checkpoint on the test split
through the same Scorer that scores real videos. With `distill`, the trained rater
then teaches the fvq_rater_lite student (an unlabeled pool of the training identities, pseudo-labels,
the student) and the two are compared on the same test videos.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .demo_data import DEFAULT_VIDEOS
from .compare import MetricSpec, compare, format_table
from .features import FeatureConfig, FeatureExtractor
from .recipe import FVQ
from .tower_pretraining import TOWER_FILE

# Small enough for 2 CPU cores in minutes; everything else is the production code path.
# The face stream reads SFace's embeddings as the network gives them: their norm says how recognisable the
# face is, the quality cue that carries over to faces the rater never saw (README, "What `fvq-rater demo` does").
DEMO_FEATURES = FeatureConfig(image_size=64, face_backend="yunet-sface", face_embedding="raw", temporal_random=True,
                              temporal_preprocess="kinetics", temporal_size=64, temporal_frames=16)
# `compare` at the end of the demo: the tiny FVQ-Rater against every baseline that runs offline.
DEMO_COMPARISON = ("fvq_rater", "piqe", "niqe", "viideo")
# Threads preparing the raters' videos in that comparison: one per core, but a few at most, since each holds its
# own copy of the rater's feature models.
DEMO_THREADS = min(os.cpu_count() or 1, 4)
# The demo's MOS are absolute (a documented function of the degradations' severity on 0-100), so its five
# levels are the fixed 20-point bins rather than FineVQ's bins between the training set's min and max.
# A LayerNorm would divide the face embedding's norm away, so the face projector is a plain MLP.
DEMO_RECIPE = FVQ.derive(level_bins="fixed", face_embedding=DEMO_FEATURES.face_embedding,
                         projectors={**FVQ.projectors, "face": "mlp"})


@dataclass
class DemoSettings:
    videos: int = DEFAULT_VIDEOS
    seed: int = 0
    stage1_epochs: int = 4
    stage2_epochs: int = 12
    batch_size: int = 8
    lr: float = 1e-3
    # LoRA rank (alpha = 2 x rank, FineVQ's scaling). Rank 16 was chosen on the validation split: over demo
    # seeds 0-2, val SRCC 0.78/0.78/0.74 against 0.75/0.74/0.56 at rank 8.
    lora_rank: int = 16
    distill: bool = False
    unlabeled: int = 200  # the pool the teacher pseudo-labels (with distill)


def run_demo(workdir, settings: DemoSettings | None = None, progress: bool = True, log=print) -> dict:
    from .data import validate
    from .demo_data import build_demo_set, format_summary, load_summary
    from .model import FVQRater, LoraSettings
    from .scoring import Scorer, evaluate, split_features
    from .tiny import tiny_rater
    from .train import TrainConfig, train

    from transformers.utils import logging as transformers_logging

    # One bar per checkpoint write would bury the demo's own output.
    transformers_logging.disable_progress_bar()
    settings = settings or DemoSettings()
    started = time.perf_counter()
    workdir = Path(workdir)
    data_dir, cache_dir = workdir / "data", workdir / "feature-cache"
    summary = load_summary(data_dir, settings.videos, settings.seed)
    if summary is None:
        log(f"Building the demo set in {data_dir} ...")
        summary = build_demo_set(data_dir, settings.videos, settings.seed, progress=progress, overwrite=True)
    else:
        log(f"Reusing the demo set in {data_dir}")
    log(format_summary(summary))
    problems = validate(data_dir, deep=False, progress=False)
    if problems:
        raise RuntimeError("the demo set is broken:\n" + "\n".join(map(str, problems)))

    extractor = FeatureExtractor(DEMO_FEATURES)
    train_set = split_features(data_dir, "train", extractor, cache_dir, progress=progress)
    val_set = split_features(data_dir, "val", extractor, cache_dir, progress=progress)
    timings = {"data_and_features_s": time.perf_counter() - started}

    model = tiny_rater(extractor, settings.seed, recipe=DEMO_RECIPE, vision_tower=TOWER_FILE,
                       lora=LoraSettings(r=settings.lora_rank, alpha=2 * settings.lora_rank))
    log(f"Tiny rater: vision tower pretrained on degraded face-free pictures ({TOWER_FILE.name}), "
        f"LLM and projectors random (seed {settings.seed})")
    spatial = extractor.preparer.spatial
    # Stage II goes on training the stage-I model in memory (LoRA, projectors), adding the head.
    for stage, epochs in ((1, settings.stage1_epochs), (2, settings.stage2_epochs)):
        stage_started = time.perf_counter()
        config = TrainConfig(stage=stage, epochs=epochs, batch_size=settings.batch_size, lr=settings.lr,
                             seed=settings.seed)
        result = train(model, spatial, train_set[:2], val_set[:2], config, workdir / f"stage{stage}", progress=progress)
        timings[f"stage{stage}_s"] = time.perf_counter() - stage_started
        best = result["best"]
        log(f"stage {stage}: best epoch {best['epoch']} of {epochs}, validation SRCC {best['val_srcc']:.3f}, "
            f"RMSE {best['val_rmse']:.1f} ({timings[f'stage{stage}_s']:.0f} s)")

    checkpoint = workdir / "stage2" / "best"
    scorer = Scorer(FVQRater.from_pretrained(checkpoint), extractor, cache_dir=cache_dir)
    report, results = evaluate(scorer, data_dir, "test", progress=progress)
    lmms_started = time.perf_counter()
    lmms_report = lmms_eval_report(checkpoint, data_dir, cache_dir)
    timings["lmms_eval_s"] = time.perf_counter() - lmms_started
    unseen = summary["splits"]["test"]["identities"]
    log(format_reports({"fvq-rater eval": report, "lmms-eval --tasks fvq20k": lmms_report},
                       f"Test split: {report['scored'] + report['failed']} videos of {len(unseen)} identities never seen "
                       f"in training ({', '.join(unseen)})"))
    faces = per_face(results, data_dir)
    log(format_per_face(faces))

    specs = [MetricSpec(name, str(checkpoint) if name == "fvq_rater" else None) for name in DEMO_COMPARISON]
    if settings.distill:
        student = distill_demo(checkpoint, data_dir, workdir, cache_dir, settings, progress, log, timings)
        specs.insert(1, MetricSpec("fvq_rater_lite", str(student)))

    compare_started = time.perf_counter()
    # resume: a rerun in the same folder reuses the predictions, keyed by video content and each metric's settings
    # (the checkpoint's files included), so only what changed is computed again. No feature cache: FVQ-Rater's
    # cost per video is then its whole cost, decoding and features included, as every other metric's is. The
    # raters prepare their videos in threads, as `score --threads` would on this machine.
    comparison = compare(data_dir, "test", specs, workdir / "compare", resume=True, progress=progress,
                         threads=DEMO_THREADS)
    timings["compare_s"] = time.perf_counter() - compare_started
    timings["total_s"] = time.perf_counter() - started
    log(f"FVQ-Rater against the baselines that run offline, on the same test videos "
        f"(fvq-rater compare; {workdir / 'compare' / 'compare.png'}):\n{format_table(comparison['rows'])}")
    if settings.distill:
        log(teacher_and_student(comparison["rows"], DEMO_THREADS))
    log(f"Checkpoint: {checkpoint}   total time {timings['total_s']:.0f} s")
    return {"report": report, "per_face": faces, "lmms_eval": lmms_report, "comparison": comparison["rows"],
            "timings": timings, "checkpoint": str(checkpoint)}


def distill_demo(teacher, data_dir, workdir, cache_dir, settings: DemoSettings, progress: bool, log,
                 timings: dict) -> Path:
    """The trained rater pseudo-labels an unlabeled pool of the training identities and teaches the student."""
    from .demo_data import build_unlabeled_pool
    from .distill import DistillConfig, distill

    started = time.perf_counter()
    pool = build_unlabeled_pool(data_dir, settings.unlabeled, settings.seed, progress=progress)
    log(f"Distilling into fvq_rater_lite: the trained rater pseudo-labels {settings.unlabeled} unlabeled videos "
        f"of the training identities ({pool})")
    report = distill(teacher, data_dir, workdir / "distill", unlabeled=pool, config=DistillConfig(seed=settings.seed),
                     cache_dir=cache_dir, progress=progress, log_line=log)
    timings["distill_s"] = time.perf_counter() - started
    val = report["student_val_srcc"]
    log(f"student: {report['labelled']} labelled + {report['pseudo_labelled']} pseudo-labelled videos, best validation "
        f"SRCC {'n/a' if val is None else f'{val:.3f}'} ({timings['distill_s']:.0f} s)")
    return Path(report["student"])


def teacher_and_student(rows: list[dict], threads: int) -> str:
    """FVQ-Rater and fvq_rater_lite side by side, from the comparison's rows."""
    by_name = {row["metric"]: row for row in rows}
    pair = [by_name["fvq_rater"], by_name["fvq_rater_lite"]]
    if any(row["status"] != "ok" for row in pair):
        return "teacher or student unavailable: " + "; ".join(row["reason"] for row in pair if row["status"] != "ok")
    lines = [f"Teacher and student on the same test videos (decoding included in s/video, videos prepared in "
             f"{threads} threads):",
             f"{'':10}{'teacher':>12}{'student':>12}"]
    for label, key, form in (("SRCC", "srcc", "{:.4f}"), ("PLCC", "plcc", "{:.4f}"), ("KRCC", "krcc", "{:.4f}"),
                             ("RMSE", "rmse", "{:.3f}"), ("s/video", "seconds_per_video", "{:.4f}"),
                             ("peak MB", "peak_mb", "{:.0f}"), ("scored", "scored", "{}")):
        lines.append(f"{label:<10}" + "".join(form.format(row[key]).rjust(12) for row in pair))
    lines.append(f"student: {pair[0]['seconds_per_video'] / pair[1]['seconds_per_video']:.1f}x the teacher's "
                 f"throughput, SRCC {pair[1]['srcc'] - pair[0]['srcc']:+.4f}")
    return "\n".join(lines)


def per_face(results: list[dict], data_dir) -> dict[str, dict]:
    """Per test identity, over the scored videos that show it alone: SRCC (does the rater rank within one face?)
    and mean score minus mean MOS (does it put every face on one scale?). The pooled SRCC needs both."""
    from .metrics import srcc

    identities = {video["name"]: video["identities"]
                  for video in json.loads((Path(data_dir) / "meta.json").read_text())["videos"]}
    by_face = {}
    for result in results:
        shown = identities[Path(result["path"]).name]
        if "score" in result and len(shown) == 1:
            by_face.setdefault(shown[0], []).append((result["score"], result["mos"]))
    faces = {}
    for name, pairs in sorted(by_face.items()):
        scores, mos = np.array(pairs).T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # too few videos: NaN, printed as n/a
            faces[name] = {"videos": len(pairs), "srcc": srcc(scores, mos), "offset": float(scores.mean() - mos.mean())}
    return faces


def format_per_face(faces: dict[str, dict]) -> str:
    lines = ["Per unseen face, over its videos alone (SRCC within the face; mean score minus mean MOS):"]
    for name, face in faces.items():
        value = "n/a" if math.isnan(face["srcc"]) else f"{face['srcc']:.4f}"
        lines.append(f"  {name:<14}{face['videos']:>4} videos   SRCC {value:>7}   offset {face['offset']:+7.2f}")
    return "\n".join(lines)


def lmms_eval_report(checkpoint, data_dir, cache_dir) -> dict:
    """The same checkpoint through lmms-eval's evaluator, model `fvq_rater` and task `fvq20k` (in-process)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    task = {"task": "fvq20k", "dataset_kwargs": {"root": str(data_dir)}}
    output = simple_evaluate(model="fvq_rater", model_args=f"pretrained={checkpoint},cache_dir={cache_dir}",
                             tasks=[task], batch_size=8, log_samples=False, task_manager=TaskManager("WARNING"),
                             verbosity="WARNING")
    results = output["results"]["fvq20k"]
    report = {metric: results[f"{metric},none"] for metric in ("srcc", "plcc", "krcc", "rmse")}
    report.update(scored=results["n_scored,none"], failed=results["n_failed,none"] + results["n_unparsed,none"])
    return report


def format_reports(reports: dict, title: str) -> str:
    """One column per way of evaluating, one row per figure."""
    rows = [("SRCC", "srcc", "{:.4f}"), ("PLCC", "plcc", "{:.4f}"), ("KRCC", "krcc", "{:.4f}"), ("RMSE", "rmse", "{:.3f}"),
            ("scored", "scored", "{}"), ("failed", "failed", "{}")]
    width = max(len(name) for name in reports) + 2
    lines = [title, " " * 8 + "".join(name.rjust(width) for name in reports)]
    lines += [label.ljust(8) + "".join(form.format(r[key]).rjust(width) for r in reports.values())
              for label, key, form in rows]
    return "\n".join(lines)
