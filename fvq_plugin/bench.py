"""`fvq-rater bench`: where the time goes, as ratios measured within one run.

--stage features: decode of 8 sampled frames vs the whole 300-frame clip, per-stream time per
video, and a cached vs uncached pipeline run.
--stage model: rater throughput at batch 1 vs batch 8 and peak memory, for the tiny config on
CPU or random InternVL2-1B/8B-sized configs (bf16, GPU).
--stage lite: FVQ-Rater (the teacher) against fvq_rater_lite (the student), end to end on the same
demo-scale clips, decoding included: seconds per video and peak memory of each, each in its own
process, with videos prepared inline and then in threads ahead of the model (`--threads`, the same
for both); and the student's import plus first score in a fresh interpreter.
--stage ray: `score --engine ray` against the local Scorer on the same videos: each one's start and
per-video cost, measured apart, and the per-video cost of each pipeline stage.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import write_atomically
from .errors import InputError


def _timed(function, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls (the first call warms caches and is not counted)."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _face_clip(path: Path, frames: int, seed: int, size=(640, 360)) -> Path:
    """A crop panning over scikit-image's astronaut with her face always in view (a face video, as the raters
    expect), H.264 with a keyframe every 2 s (as web video)."""
    import cv2
    from skimage import data

    from .demo_data import IDENTITIES
    from .video import write_video

    image = data.astronaut()
    rng = np.random.default_rng(seed)
    width, height = size
    crop_w, crop_h = 320, 180
    face_x0, face_y0, face_x1, face_y1 = IDENTITIES["astronaut"].focus_pixels(image.shape)
    x0 = rng.integers(max(0, math.ceil(face_x1) - crop_w), min(image.shape[1] - crop_w, int(face_x0)) + 1, 2)
    y0 = rng.integers(max(0, math.ceil(face_y1) - crop_h), min(image.shape[0] - crop_h, int(face_y0)) + 1, 2)
    steps = np.linspace(0, 1, frames)[:, None]
    corners = np.round(np.array([x0[0], y0[0]]) * (1 - steps) + np.array([x0[1], y0[1]]) * steps).astype(int)
    clips = (cv2.resize(image[y:y + crop_h, x:x + crop_w], (width, height)) for x, y in corners)
    write_video(path, clips, fps=24, keyframe_interval=48)
    return path


def bench_features(config=None, videos: int = 4, device: str = "cpu") -> dict:
    from .features import FeatureConfig, FeatureExtractor
    from .scoring import extract_features
    from .video import all_frames, dense_clip, sample_frames

    config = config or FeatureConfig(temporal_random=True)
    extractor = FeatureExtractor(config, device=device)
    preparer = extractor.preparer
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        long_clip = _face_clip(scratch / "long.mp4", 300, seed=0)
        sampled = _timed(lambda: sample_frames(long_clip, config.num_frames))
        full = _timed(lambda: sample_frames(long_clip, 300))
        clips = [_face_clip(scratch / f"clip{i}.mp4", 96, seed=i + 1) for i in range(videos)]
        frames = [sample_frames(c, config.num_frames).frames for c in clips]
        stages = {"decode": _timed(lambda: [sample_frames(c, config.num_frames) for c in clips]) / videos,
                  "spatial": _timed(lambda: [preparer.spatial(f) for f in frames]) / videos}
        if preparer.portrait is not None:
            stages["portrait"] = _timed(lambda: [preparer.portrait(f) for f in frames]) / videos
        if preparer.face is not None:
            stages["face"] = _timed(lambda: [preparer.face(f) for f in frames]) / videos
        if extractor.temporal is not None:
            def temporal():
                if config.temporal_preprocess == "finevq":
                    dense = [all_frames(c, size=extractor.temporal.size).frames for c in clips]
                else:
                    dense = [dense_clip(c, config.temporal_frames, config.temporal_size).frames for c in clips]
                extractor.temporal([preparer.clip_preprocess(d) for d in dense])
            stages["temporal"] = _timed(temporal, repeats=1) / videos

        def pipeline(cache):
            for _ in extract_features(clips, extractor, cache, batch_size=videos, progress=False):
                pass
        uncached = _timed(lambda: pipeline(None), repeats=1)
        cache = scratch / "cache"
        pipeline(cache)
        cached = _timed(lambda: pipeline(cache))
    return {"config": config.to_dict(), "videos": videos,
            "decode_300_frames_s": full, "decode_sampled_s": sampled, "sampled_over_full": sampled / full,
            "per_video_s": stages, "pipeline_uncached_s": uncached, "pipeline_cached_s": cached,
            "cached_over_uncached": cached / uncached}


def real_size_backbone(name: str, tokenizer):
    """Random InternVL2-1B / InternVL2-8B-shaped configs (InternViT-300M + Qwen2-0.5B / InternLM2-7B)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, image_size=448, patch_size=14)
    if name == "internvl2-1b":
        text = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151655)
    elif name == "internvl2-8b":
        text = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=14336, vocab_size=92553)
    else:
        raise InputError(f"unknown backbone size {name!r}; expected tiny, internvl2-1b or internvl2-8b")
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                          downsample_ratio=0.5, tie_word_embeddings=False)


def bench_model(size: str = "tiny", device: str = "cpu", dtype=None, batches=(1, 8), repeats: int = 3) -> dict:
    from .model import FVQRater, FVQRaterConfig
    from .tiny import tiny_backbone_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    backbone = tiny_backbone_config(tokenizer) if size == "tiny" else real_size_backbone(size, tokenizer)
    dtype = dtype or (torch.float32 if size == "tiny" else torch.bfloat16)
    if size != "tiny" and not str(device).startswith("cuda"):
        raise InputError(f"the {size} configuration needs a GPU (--device cuda)")
    with torch.device(device):
        model = FVQRater.random(FVQRaterConfig(face_dim=512), backbone, tokenizer).to(dtype).eval()
    height, width = model.image_size
    frames = model.config.num_frames
    results = {}
    for batch in batches:
        inputs = {"pixel_values": torch.randn(batch, frames, 3, height, width, device=device, dtype=dtype),
                  "portrait_values": torch.randn(batch, frames, 3, height, width, device=device, dtype=dtype),
                  "face_embeds": torch.randn(batch, frames, 512, device=device),
                  "face_mask": torch.ones(batch, frames, dtype=torch.bool, device=device),
                  "temporal": torch.randn(batch, 2304, device=device)}
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def forward():
            with torch.no_grad():
                model(**inputs)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
        seconds = _timed(forward, repeats)
        results[batch] = {"seconds": seconds, "videos_per_s": batch / seconds,
                          "peak_memory_mb": _peak_memory_mb(device)}
    first, last = batches[0], batches[-1]
    return {"size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "prompt_tokens": int(model.prompt_ids.numel()), "batches": results,
            f"throughput_b{last}_over_b{first}": results[last]["videos_per_s"] / results[first]["videos_per_s"]}


def _peak_memory_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process so far


def format_features(result: dict) -> str:
    rows = ["stage        s/video"] + [f"{k:<12} {v:7.4f}" for k, v in result["per_video_s"].items()]
    rows += [f"decode 8 sampled frames / whole 300-frame clip: {result['decode_sampled_s']:.4f} / "
             f"{result['decode_300_frames_s']:.4f} s = {result['sampled_over_full']:.3f}",
             f"pipeline cached / uncached ({result['videos']} videos): {result['pipeline_cached_s']:.4f} / "
             f"{result['pipeline_uncached_s']:.4f} s = {result['cached_over_uncached']:.4f}"]
    return "\n".join(rows)


def format_model(result: dict) -> str:
    rows = [f"{result['size']} on {result['device']} ({result['dtype']}, {result['prompt_tokens']} prompt tokens)",
            "batch  s/forward  videos/s  peak MB"]
    rows += [f"{b:>5}  {r['seconds']:9.4f}  {r['videos_per_s']:8.2f}  {r['peak_memory_mb']:7.0f}"
             for b, r in result["batches"].items()]
    ratio = next(k for k in result if k.startswith("throughput_"))
    rows.append(f"{ratio.replace('_', ' ')}: {result[ratio]:.2f}")
    return "\n".join(rows)


def save(result: dict, path) -> None:
    write_atomically(path, json.dumps(result, indent=2, default=str))


def _time_scorer(checkpoint: str, clips: list[str], device: str, batch_size: int, thread_counts,
                 repeats: int = 3) -> dict:
    """In a worker process: load and score one clip (lazy loads), score one batch untimed (the kernels of a
    full batch), then time scoring all clips (no feature cache) with videos prepared in each number of
    threads (0: inline), the median of `repeats` runs."""
    import resource

    from .lite import LiteScorer, is_student
    from .scoring import Scorer

    started = time.perf_counter()
    scorer = (LiteScorer if is_student(checkpoint) else Scorer).from_pretrained(checkpoint, device=device,
                                                                                  batch_size=batch_size)
    scorer.score(clips[:1], progress=False)
    load = time.perf_counter() - started
    scorer.score(clips[:batch_size], progress=False)
    seconds = {}
    for threads in thread_counts:
        scorer.threads = threads
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            results = scorer.score(clips, progress=False)
            runs.append((time.perf_counter() - started) / len(clips))
            failed = [r["error"] for r in results if "error" in r]
            if failed:
                raise RuntimeError(f"{len(failed)} bench clips failed: {failed[0]}")
        seconds[str(threads)] = statistics.median(runs)
    return {"seconds_per_video": seconds, "load_and_first_s": load,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _first_score_seconds(student: str, clip: str) -> float:
    """Import of the student's code, loading and one score, timed inside a fresh interpreter."""
    import subprocess
    import sys

    code = ("import time; started = time.perf_counter()\n"
            "from fvq_plugin.lite import LiteScorer\n"
            f"LiteScorer.from_pretrained({student!r}).score([{clip!r}], progress=False)\n"
            "print(time.perf_counter() - started)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _demo_teacher(folder: Path) -> Path:
    """A random FVQ-Rater of the demo's size and features."""
    from .demo import DEMO_FEATURES, DEMO_RECIPE
    from .features import FeatureExtractor
    from .tiny import tiny_rater

    return tiny_rater(FeatureExtractor(DEMO_FEATURES), recipe=DEMO_RECIPE).save_pretrained(folder)


def _demo_clips(folder: Path, videos: int) -> list[str]:
    from .demo_data import DEFAULT_FRAMES, DEFAULT_SIZE

    return [str(_face_clip(folder / f"clip{i}.mp4", DEFAULT_FRAMES, seed=i, size=(DEFAULT_SIZE, DEFAULT_SIZE)))
            for i in range(videos)]


def bench_lite(teacher=None, student=None, videos: int = 8, device: str = "cpu", batch_size: int = 8,
               threads: int | None = None) -> dict:
    """Teacher and student on the same clips (random demo-scale models unless checkpoints are given), each
    with its videos prepared inline and then in `threads` threads (default: one per core) ahead of the model;
    seconds per video are the median of 3 runs."""
    from .compare import _in_worker
    from .demo_data import DEFAULT_FRAMES, DEFAULT_SIZE
    from .lite import LiteRater, save_student

    thread_counts = (0, threads or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher = teacher or _demo_teacher(scratch / "teacher")
        if student is None:
            student = save_student(LiteRater(), scratch / "student")
        clips = _demo_clips(scratch, videos)
        timed = {name: _in_worker(_time_scorer, str(path), clips, device, batch_size, thread_counts)
                 for name, path in (("teacher", teacher), ("student", student))}
        first = _first_score_seconds(str(student), clips[0])
    teacher_s, student_s = timed["teacher"]["seconds_per_video"], timed["student"]["seconds_per_video"]
    return {"videos": videos, "clip": f"{DEFAULT_SIZE}x{DEFAULT_SIZE}, {DEFAULT_FRAMES} frames", "device": device,
            "teacher": {"checkpoint": str(teacher), **timed["teacher"]},
            "student": {"checkpoint": str(student), **timed["student"]},
            "student_speedup": {count: teacher_s[count] / student_s[count] for count in teacher_s},
            "student_import_and_first_score_s": first}


def format_lite(result: dict) -> str:
    prepared = {count: "inline" if count == "0" else f"in {count} threads" for count in result["student_speedup"]}
    rows = [f"end to end on {result['videos']} clips ({result['clip']}) on {result['device']}: decoding and every "
            "model included, no feature cache",
            " " * 10 + "".join(f"{'s/video, ' + where:>22}" for where in prepared.values()) + "   peak MB   load + first s"]
    for name in ("teacher", "student"):
        timed = result[name]
        seconds = "".join(f"{timed['seconds_per_video'][count]:22.4f}" for count in prepared)
        rows.append(f"{name:<10}{seconds} {timed['peak_memory_mb']:9.0f} {timed['load_and_first_s']:16.2f}")
    rows += [f"student throughput / teacher throughput, both preparing videos {where}: "
             f"{result['student_speedup'][count]:.1f}x" for count, where in prepared.items()]
    rows.append(f"student import + load + first score in a fresh interpreter: "
                f"{result['student_import_and_first_score_s']:.2f} s")
    return "\n".join(rows)


def _stage_seconds(checkpoint: str, clips: list[str], device: str, batch_size: int) -> dict:
    """In a worker process: seconds per video of each stage of the Ray pipeline, run in one process."""
    from .lite import LiteScorer, is_student
    from .scoring import Scorer, finish_features, prepare_video

    scorer = (LiteScorer if is_student(checkpoint) else Scorer).from_pretrained(checkpoint, device=device)
    scorer.score(clips[:1], progress=False)  # lazy loads
    started = time.perf_counter()
    items = [prepare_video(clip, scorer.extractor.preparer, None) for clip in clips]
    prepare = (time.perf_counter() - started) / len(clips)
    started = time.perf_counter()
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        finish_features(batch, scorer.extractor, None)
        scorer.results(batch)
    return {"prepare_s_per_video": prepare, "rate_s_per_video": (time.perf_counter() - started) / len(clips)}


def bench_ray(checkpoint=None, videos: int = 160, device: str = "cpu", batch_size: int = 8, address=None) -> dict:
    """The Ray engine against the local Scorer on the same videos, with the per-video cost of each stage;
    a random demo-scale FVQ-Rater unless a checkpoint is given.

    Both pay a start before their first video (a model load; for Ray, every actor's) and then a cost per
    video; the two are measured apart. For Ray the per-video cost is the difference of two runs, on all
    videos and on a fifth of them, divided by the difference in videos. The videos are 8 distinct clips
    under `videos` names (no feature cache, so each is decoded and rated in full).
    """
    import functools
    import os

    from .compare import _in_worker
    from .ray_scoring import _ray_session, score_on_ray
    from .scoring import Scorer, checkpoint_extractor

    if videos < 10:
        raise InputError(f"--videos {videos}: the ray stage needs at least 10 videos (two runs of different sizes)")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        checkpoint = str(checkpoint or _demo_teacher(scratch / "rater"))
        clips = _demo_clips(scratch, 8)
        names = []
        for i in range(videos):
            names.append(str(scratch / f"video{i:05d}.mp4"))
            os.link(clips[i % len(clips)], names[-1])
        local = _in_worker(_time_scorer, checkpoint, names, device, batch_size)
        stages = _in_worker(_stage_seconds, checkpoint, names[:16], device, batch_size)
        runs = {}
        with _ray_session(address, progress=False) as ray:
            cpus = ray.cluster_resources().get("CPU", 0)
            for count in (videos // 5, videos):
                started = time.perf_counter()
                summary = score_on_ray(names[:count], scratch / f"ray{count}",
                                       functools.partial(checkpoint_extractor, checkpoint),
                                       functools.partial(Scorer.from_pretrained, checkpoint, device=device),
                                       batch_size=batch_size, gpus_per_rater=float(device.startswith("cuda")),
                                       progress=False)
                if summary["failed"]:
                    raise RuntimeError(f"{summary['failed']} bench videos failed on Ray")
                runs[count] = time.perf_counter() - started
    per_video = (runs[videos] - runs[videos // 5]) / (videos - videos // 5)
    return {"videos": videos, "device": device, "cluster_cpus": cpus, "batch_size": batch_size, "local": local,
            "stages": stages, "ray": {"seconds_per_video": per_video, "start_s": runs[videos] - per_video * videos,
                                      "run_s": {str(count): seconds for count, seconds in runs.items()}},
            "ray_vs_local": local["seconds_per_video"] / per_video,
            "ray_vs_local_end_to_end": (local["load_and_first_s"] + local["seconds_per_video"] * videos) / runs[videos]}


def format_ray(result: dict) -> str:
    local, ray, stages = result["local"], result["ray"], result["stages"]
    return "\n".join([
        f"{result['videos']} demo-scale videos on {result['device']}, {result['cluster_cpus']:g} Ray CPUs, "
        f"batch {result['batch_size']}, no feature cache",
        "                 s/video   start s",
        f"local Scorer     {local['seconds_per_video']:7.4f}   {local['load_and_first_s']:7.2f}  (model load, first video)",
        f"ray              {ray['seconds_per_video']:7.4f}   {ray['start_s']:7.2f}  (every actor's start)",
        f"stages, one process: prepare (decode, faces, portraits) {stages['prepare_s_per_video']:.4f} s/video, "
        f"rate (SlowFast, rater) {stages['rate_s_per_video']:.4f} s/video",
        f"ray throughput / local throughput: {result['ray_vs_local']:.2f}x per video; "
        f"{result['ray_vs_local_end_to_end']:.2f}x for these {result['videos']} videos, starts included"])
