"""`fvq-rater` command line. Each command imports what it needs, so `--help` stays instant."""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

from .common import KEY_METRICS, LITE_WEIGHTS_ENV, WEIGHTS_ENV

COMPARE_POOLS = ("mean", "median", "min")  # the poolings compare._frame_metric knows

DEMO_DIR = "fvq-demo"
DEFAULT_VIDEOS = 400  # fvq_plugin.demo_data.DEFAULT_VIDEOS, without importing numpy/cv2 for --help
ATTENTION = ("sdpa", "flash_attention_2", "eager")


class UsageError(Exception):
    """A mistake in the command line, told in one line that names the flag and the fix."""


def _make_demo_data(args) -> int:
    from .demo_data import build_demo_set, build_unlabeled_pool, format_summary

    summary = build_demo_set(args.out, n_videos=args.videos, seed=args.seed, overwrite=args.overwrite)
    print(format_summary(summary))
    if args.unlabeled:
        pool = build_unlabeled_pool(args.out, args.unlabeled, seed=args.seed)
        print(f"unlabeled pool: {args.unlabeled} videos of the training identities in {pool} (labels withheld)")
    return 0


def _validate(args) -> int:
    from .data import SPLITS, validate

    splits = [args.split] if args.split else SPLITS
    problems = validate(args.root, splits=splits, deep=args.deep)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {args.root} ({', '.join(splits)}{', videos opened' if args.deep else ''})")
    return 1 if problems else 0


def _feature_overrides(args) -> dict:
    from .features.pipeline import FEATURE_OVERRIDES

    overrides = {name: getattr(args, name) for name in FEATURE_OVERRIDES if getattr(args, name, None) is not None}
    if getattr(args, "temporal_random", False):
        overrides["temporal_random"] = True
    return overrides


def _check_runtime(args) -> None:
    """--device, --attn, --workers, --threads and --timeout-per-video problems of any command that has them, found
    before a model is loaded."""
    timeout = getattr(args, "timeout_per_video", None)
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout-per-video {timeout:g}: give a positive number of seconds")
    for flag in ("--workers", "--threads"):
        if (getattr(args, flag[2:], None) or 0) < 0:
            raise UsageError(f"{flag} {getattr(args, flag[2:])}: give a count, 0 or more")
    if getattr(args, "threads", None) and (getattr(args, "workers", 0) or timeout is not None):
        raise UsageError("--threads prepares videos in this process; it does not combine with --workers or "
                         "--timeout-per-video, which need worker processes")
    if getattr(args, "device", "cpu").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
    if getattr(args, "attn", None) == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UsageError("--attn flash_attention_2 needs the flash-attn package (pip install flash-attn, on a CUDA "
                             "machine); or use --attn sdpa")


def _check_output_file(path, flag: str, example: str) -> None:
    """Before any scoring: the file's folder is created, and a folder given as the file is refused."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name, e.g. {flag} {target / example}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def _scorer(args):
    from .checkpoint import checkpoint_path, parse_dtype
    from .lite import is_student
    from .scoring import Scorer

    if args.weights and is_student(args.weights):
        return _student_scorer(args)
    return Scorer.from_pretrained(checkpoint_path(args.weights, "--weights DIR"), device=args.device,
                                  dtype=parse_dtype(args.dtype), device_map=args.device_map, attn_implementation=args.attn,
                                  feature_overrides=_feature_overrides(args), merge_lora=args.merge_lora,
                                  batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                                  cache_dir=args.cache, timeout_per_video=args.timeout_per_video)


def _student_scorer(args):
    """fvq_rater_lite in place of FVQ-Rater: the backbone and feature-model options do not apply to it."""
    from .lite import LiteScorer

    given = [f"--{name.replace('_', '-')}" for name in ("dtype", "device_map", "attn", *_feature_overrides(args))
             if getattr(args, name, None) not in (None, "auto", False)]
    if given:
        raise UsageError(f"{', '.join(given)}: {args.weights} is an fvq_rater_lite student, which has no backbone or "
                         "feature models to set")
    return LiteScorer.from_pretrained(args.weights, device=args.device, batch_size=args.batch_size,
                                      workers=args.workers, threads=args.threads, cache_dir=args.cache,
                                      timeout_per_video=args.timeout_per_video)


def _check_outputs(args) -> None:
    _check_output_file(args.output, "--output", "results.jsonl")
    _check_output_file(args.csv, "--csv", "results.csv")


def _media_files(inputs) -> list[str]:
    """The given files, with every folder replaced by the videos and images below it (sorted)."""
    from .video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    paths = []
    for given in inputs:
        if not Path(given).is_dir():
            paths.append(given)
            continue
        found = sorted(str(p) for p in Path(given).rglob("*")
                       if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
        if not found:
            raise UsageError(f"{given}: no video or image files in this folder")
        paths += found
    return paths


def _score_inputs(args) -> list[str]:
    """The videos named by the positional paths, --manifest or --data/--split (exactly one of them)."""
    given = [name for name, value in (("PATH", args.paths), ("--manifest", args.manifest), ("--data", args.data))
             if value]
    if len(given) != 1:
        raise UsageError(f"name the videos one way: PATH..., --manifest FILE or --data ROOT --split S (got "
                         f"{' and '.join(given) or 'none'})")
    if args.manifest:
        from .ray_scoring import read_manifest

        paths = read_manifest(args.manifest)
        if not paths:
            raise UsageError(f"--manifest {args.manifest}: no video paths in it")
        return paths
    if args.data:
        from .data import read_split

        return [str(r.path) for r in read_split(args.data, args.split)]
    return _media_files(args.paths)


def _score(args) -> int:
    if args.engine == "ray":
        return _score_on_ray(args)
    ray_only = [flag for flag in ("--manifest", "--address", "--prepare-actors", "--rate-actors", "--gpus-per-rater")
                if getattr(args, flag[2:].replace("-", "_")) is not None]
    if ray_only:
        raise UsageError(f"{', '.join(ray_only)}: options of --engine ray")
    paths = _score_inputs(args)
    _check_outputs(args)
    scorer = _scorer(args)
    results = scorer.score(paths, output=args.output, progress=not args.json)
    resumed = scorer.resumed
    _maybe_csv(results, args.csv)
    failed = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            flags = f"[{', '.join(result['flags'])}]  " if result.get("flags") else ""
            shown = f"{result['score']:6.2f}  {result['level']:<9}" if "score" in result else f"error: {result['error']}"
            print(f"{shown}  {flags}{result['path']}")  # the path last, as sha256sum and du print it
    summary = f"{len(results) - len(failed)} scored, {len(failed)} failed"
    summary += f", {resumed} resumed from {args.output}" if resumed else ""
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


def _score_on_ray(args) -> int:
    """`score --engine ray`: the same scorer, built once per Ray actor (see fvq_plugin.ray_scoring)."""
    from .checkpoint import checkpoint_path
    from .ray_scoring import format_summary, read_output, require_ray, score_on_ray
    from .scoring import checkpoint_extractor

    require_ray()
    local_only = [flag for flag, value in (("--workers", args.workers), ("--threads", args.threads),
                                           ("--timeout-per-video", args.timeout_per_video)) if value]
    if local_only:
        raise UsageError(f"{', '.join(local_only)}: options of the local engine (Ray's actor pools replace them: "
                         "--prepare-actors, --rate-actors)")
    if not args.output:
        raise UsageError("--engine ray writes its results to a folder: give --output DIR")
    for flag in ("--batch-size", "--prepare-batch-size", "--prepare-actors", "--rate-actors"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: give a positive number")
    paths = _score_inputs(args)
    _check_output_file(args.csv, "--csv", "results.csv")
    args.weights = checkpoint_path(args.weights, "--weights DIR")
    if not Path(args.weights).is_absolute():
        args.weights = str(Path(args.weights).resolve())  # actors may start in another folder
    # Each rating actor builds its scorer as this command would; the feature cache is the pipeline's.
    actor_args = argparse.Namespace(**{**vars(args), "workers": 0, "threads": 0, "cache": None,
                                       "timeout_per_video": None})
    gpus = args.gpus_per_rater if args.gpus_per_rater is not None else float(args.device.startswith("cuda"))
    summary = score_on_ray(paths, args.output, functools.partial(checkpoint_extractor, args.weights, _feature_overrides(args)),
                           functools.partial(_scorer, actor_args), cache_dir=args.cache, batch_size=args.batch_size,
                           prepare_batch_size=args.prepare_batch_size, prepare_actors=args.prepare_actors,
                           rate_actors=args.rate_actors or 1, gpus_per_rater=gpus, resume=args.resume,
                           address=args.address, progress=not args.json)
    if args.csv:
        results = read_output(args.output)
        _maybe_csv([results[p] for p in dict.fromkeys(paths) if p in results], args.csv)
    print(json.dumps(summary) if args.json else format_summary(summary, args.output))
    return 1 if summary["failed"] else 0


def _maybe_csv(results, path):
    if path:
        from .scoring import write_csv

        write_csv(results, path)


def _eval(args) -> int:
    import warnings

    from .data import read_split
    from .metrics import MIN_SAMPLES
    from .scoring import evaluate

    read_split(args.data, args.split)  # a broken dataset is reported before the model loads
    _check_outputs(args)
    scorer = _scorer(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined correlations are said plainly below
        report, results = evaluate(scorer, args.data, args.split, output=args.output)
    _maybe_csv(results, args.csv)
    for result in results:
        if "error" in result:
            print(f"failed: {result['path']}: {result['error']}", file=sys.stderr)
    counts = f"{report['scored']} scored, {report['failed']} failed"
    too_few = report["scored"] < MIN_SAMPLES
    if args.json:
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in report.items()}))
    elif too_few:
        print(f"{args.split}: only {counts}; SRCC, PLCC, KRCC and RMSE need at least {MIN_SAMPLES} scored videos")
    else:
        print(f"{args.split}: SRCC {report['srcc']:.4f}  PLCC {report['plcc']:.4f}  KRCC {report['krcc']:.4f}  "
              f"RMSE {report['rmse']:.3f}  ({counts})")
    return 1 if too_few or report["failed"] else 0


def _pairs(values, flag: str, optional_name: bool = False) -> dict:
    """NAME=VALUE options; with optional_name a bare VALUE is named after its file."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep and optional_name:
            name, rest = Path(value).stem, value
        elif not sep or not name or not rest:
            raise UsageError(f"{flag} {value}: expected NAME=PATH")
        pairs[name] = rest
    return pairs


def _compare(args) -> int:
    from .checkpoint import checkpoint_path
    from .compare import FVQ, LITE, MetricSpec, check_metric_names, compare, format_table
    from .lite import student_path
    from .data import read_split

    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    if not names and not args.lmms_eval_samples:
        raise UsageError("--metrics: name at least one metric, e.g. --metrics fvq_rater,piqe")
    if args.frames < 1 or args.batch_size < 1:
        raise UsageError(f"--frames {args.frames} --batch-size {args.batch_size}: give at least 1 of each")
    weights = _pairs(args.metric_weights, "--metric-weights")
    samples = _pairs(args.lmms_eval_samples, "--lmms-eval-samples", optional_name=True)
    for path in [*weights.values(), *samples.values()]:
        if not Path(path).exists():
            raise UsageError(f"{path}: no such file or folder")
    check_metric_names(names)
    read_split(args.data, args.split)  # a broken dataset is reported before any metric loads
    # Without weights FVQ-Rater is listed as unavailable; weights that are given must be a checkpoint.
    if FVQ in names and FVQ not in weights and (args.weights or os.environ.get(WEIGHTS_ENV)):
        weights[FVQ] = checkpoint_path(args.weights, "--weights DIR")
    if LITE in names:
        weights.setdefault(LITE, os.environ.get(LITE_WEIGHTS_ENV))
        if weights[LITE]:
            student_path(weights[LITE], f"--metric-weights {LITE}=DIR")
    specs = [MetricSpec(name, weights.get(name), args.frames, args.pool, args.device) for name in names]
    result = compare(args.data, args.split, specs, args.out, lmms_samples=samples, resume=args.resume,
                     batch_size=args.batch_size, cache_dir=args.cache, progress=not args.json, threads=args.threads)
    if args.json:
        print(json.dumps(result["rows"]))
    else:
        print(format_table(result["rows"]))
        print(f"wrote {Path(args.out) / 'compare.csv'}, compare.json and compare.png")
    return 0


def _features(args) -> int:
    from .data import read_split
    from .features import FeatureExtractor
    from .scoring import split_features

    read_split(args.data, args.split)
    if args.weights:  # the feature configuration the checkpoint was trained with, so `eval --cache` finds them
        from .checkpoint import checkpoint_path, feature_settings, read_config

        directory = checkpoint_path(args.weights, "--weights DIR")
        config = feature_settings(directory, read_config(directory)["features"])
    else:
        config = {"image_size": args.image_size}
    extractor = FeatureExtractor(_feature_config(config, args), device=args.device)
    features, _, failures = split_features(args.data, args.split, extractor, args.out, args.batch_size, args.workers,
                                           threads=args.threads)
    for failure in failures:
        print(f"failed: {failure['path']}: {failure['error']}", file=sys.stderr)
    print(f"{len(features)} videos' features cached in {Path(args.out) / extractor.key_digest()}, {len(failures)} failed")
    return 1 if failures else 0


def _feature_config(base: dict, args):
    """The feature settings `base` with the command's overrides; SlowFast weights are never assumed."""
    from .features import FeatureConfig

    config = FeatureConfig.from_dict({**base, **_feature_overrides(args)})
    if "temporal" in config.streams and not (config.temporal_weights or config.temporal_random):
        raise UsageError("the temporal stream needs SlowFast-R50 weights: pass --temporal-weights SLOWFAST_8x8_R50.pyth "
                         "(the official Kinetics checkpoint), or --temporal-random for tests and demos (no learned motion)")
    return config


def _train(args) -> int:
    from .checkpoint import checkpoint_path, load_backbone, parse_dtype
    from .data import read_split
    from .features import FeatureExtractor
    from .model import FVQRater, FVQRaterConfig, LoraSettings
    from .recipe import load_recipe
    from .scoring import split_features
    from .tiny import tiny_rater
    from .train import TrainConfig, train

    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError(f"--epochs {args.epochs} --batch-size {args.batch_size}: give at least 1 of each")
    for split in ("train", "val"):
        read_split(args.data, split)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out} is not empty: pass --resume to continue that run, --overwrite to replace "
                         "its checkpoints, or another --out")
    if args.init:
        fixed = [flag for flag, given in (("--recipe", args.recipe), ("--recipe-file", args.recipe_file),
                                          ("--frames", args.frames)) if given]
        if fixed:
            raise UsageError(f"{', '.join(fixed)}: --init continues a rater with its own recipe; these set up new ones")
        model = FVQRater.from_pretrained(checkpoint_path(args.init, "--init DIR"), trainable=True,
                                         dtype=parse_dtype(args.dtype))
        extractor = FeatureExtractor(_feature_config(model.config.features, args), device=args.device)
        model.config.features = extractor.config.to_dict()  # the settings trained with, overrides included
    else:
        if args.stage == 2:
            print("train --stage 2 without --init starts from scratch (new LoRA, projectors and head); pass "
                  "--init RUN/best to continue a stage-1 run", file=sys.stderr)
        lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha)
        if args.backbone:
            from transformers import AutoConfig

            # Feature settings are checked before the (large) backbone loads.
            image_size = AutoConfig.from_pretrained(args.backbone).vision_config.image_size
            base = {"image_size": image_size[0] if isinstance(image_size, (list, tuple)) else image_size}
        else:
            from .demo import DEMO_FEATURES

            # The tiny random backbone is a toy: it gets the demo's small feature settings (random SlowFast).
            base = DEMO_FEATURES.to_dict()
        recipe = load_recipe(args.recipe, args.recipe_file)
        recipe = recipe.derive(num_frames=args.frames or recipe.num_frames)
        # The toy backbone keeps the demo's cheap SlowFast clip (tiny_rater names the recipe after the change).
        base.update(streams=recipe.streams, num_frames=recipe.num_frames, frame_sampling=recipe.frame_sampling,
                    face_embedding=recipe.face_embedding,
                    temporal_preprocess=base["temporal_preprocess"] if not args.backbone else recipe.temporal)
        extractor = FeatureExtractor(_feature_config(base, args), device=args.device)
        if args.backbone:
            vlm, tokenizer = load_backbone(args.backbone, dtype=parse_dtype(args.dtype), attn_implementation=args.attn)
            config = FVQRaterConfig(face_dim=extractor.face_dim, recipe=recipe, lora=lora,
                                    features=extractor.config.to_dict())
            model = FVQRater.create(config, vlm, tokenizer, base_path=args.backbone)
        else:
            model = tiny_rater(extractor, args.seed, recipe=recipe, lora=lora)
    train_set = split_features(args.data, "train", extractor, args.cache, args.batch_size, args.workers,
                               threads=args.threads)
    val_set = split_features(args.data, "val", extractor, args.cache, args.batch_size, args.workers,
                             threads=args.threads)
    config = TrainConfig(stage=args.stage, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         grad_accum=args.grad_accum, mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing, ce_weight=args.ce_weight,
                         key_metric=args.key_metric, seed=args.seed)
    result = train(model, extractor.preparer.spatial, train_set[:2], val_set[:2], config, args.out, resume=args.resume)
    best = result["best"]
    print(f"best: epoch {best['epoch']}, validation SRCC {best['val_srcc']:.4f}; "
          f"checkpoints in {args.out}/best and {args.out}/last")
    return 0


def _convert(args) -> int:
    from .convert import main_convert
    from .recipe import load_recipe

    return main_convert(args.src, args.dst, args.map or [], load_recipe(args.recipe, args.recipe_file),
                        allow_unmatched=args.allow_unmatched)


def _bench(args) -> int:
    from . import bench

    args.videos = args.videos or (160 if args.stage == "ray" else 4)
    if args.stage == "features":
        from .features import FeatureConfig

        config = FeatureConfig.from_dict({"temporal_random": True, "image_size": args.image_size,
                                          "temporal_preprocess": args.temporal, **_feature_overrides(args)})
        result = bench.bench_features(config, videos=args.videos, device=args.device)
        table = bench.format_features(result)
    elif args.stage == "lite":
        from .checkpoint import checkpoint_path
        from .lite import load_student

        teacher = checkpoint_path(args.teacher, "--teacher DIR") if args.teacher else None
        if args.weights:
            load_student(args.weights)  # a wrong folder is said before anything is timed
        result = bench.bench_lite(teacher, args.weights, videos=args.videos, device=args.device, threads=args.threads)
        table = bench.format_lite(result)
    elif args.stage == "ray":
        from .checkpoint import checkpoint_path
        from .ray_scoring import require_ray

        require_ray()
        weights = checkpoint_path(args.weights, "--weights DIR") if args.weights else None
        result = bench.bench_ray(weights, videos=args.videos, device=args.device, address=args.address)
        table = bench.format_ray(result)
    else:
        result = bench.bench_model(args.size, device=args.device)
        table = bench.format_model(result)
    bench.save(result, args.out)
    print(json.dumps(result, indent=2, default=str) if args.json else f"{table}\nsaved {args.out}")
    return 0


def _demo(args) -> int:
    """The main job on the embedded default (see fvq_plugin.demo)."""
    from .demo import DemoSettings, run_demo

    run_demo(args.workdir, DemoSettings(videos=args.videos, seed=args.seed, distill=args.distill))
    return 0


def _distill(args) -> int:
    from .checkpoint import checkpoint_path
    from .distill import DistillConfig, distill
    from .lite import SAMPLING_PRESETS, load_student

    teacher = checkpoint_path(args.teacher, "--teacher DIR")
    if args.student_init:
        load_student(args.student_init)  # a wrong folder is said before the teacher runs
    config = DistillConfig(rounds=args.rounds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           rank_weight=args.rank_weight, pseudo_weight=args.pseudo_weight, seed=args.seed,
                           teacher_epochs=args.teacher_epochs, lite=SAMPLING_PRESETS[args.student_sampling])
    report = distill(teacher, args.data, args.out, unlabeled=args.unlabeled, config=config,
                     student_init=args.student_init, cache_dir=args.cache, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for failure in report["failed"]:
        print(f"skipped: {failure['path']}: {failure['error']}", file=sys.stderr)
    val = report["student_val_srcc"]
    print(f"student: {report['labelled']} labelled + {report['pseudo_labelled']} pseudo-labelled videos, "
          f"best validation SRCC {'n/a' if val is None else f'{val:.4f}'}\nwrote {report['student']}")
    print(f"next: fvq-rater eval --weights {report['student']} --data {args.data}")
    return 0


def _export_onnx(args) -> int:
    from .lite import check_onnx, export_onnx, load_student

    model = load_student(args.student)
    out = Path(args.out or Path(args.student) / "fvq_rater_lite.onnx")
    _check_output_file(out, "--out", "fvq_rater_lite.onnx")
    export_onnx(model, out)
    difference = check_onnx(model, out)
    print(f"wrote {out}; onnxruntime and torch differ by at most {difference:.2e} (on random inputs, batch 3)")
    return 0 if difference <= 1e-4 else 1


def _add_feature_args(parser):
    group = parser.add_argument_group("feature extractors")
    group.add_argument("--video-backend", choices=["auto", "pyav", "decord"], help="video decoder (default: the checkpoint's, else auto)")
    group.add_argument("--face-backend", choices=["yunet-sface", "insightface"], help="face detector and identity model (default: the checkpoint's)")
    group.add_argument("--face-models", help="insightface model folder (default: env FVQ_FACE_MODELS)")
    group.add_argument("--portrait-model", help="a .tflite person-segmentation model (default: the shipped one)")
    group.add_argument("--temporal-weights", help="SlowFast-R50 Kinetics checkpoint (.pyth)")
    group.add_argument("--temporal-random", action="store_true", help="random SlowFast weights (testing only)")


def _add_recipe_args(parser, what: str, required: bool = False):
    from .recipe import RECIPES  # torch-free

    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--recipe", choices=list(RECIPES),
                       help=f"conventions of {what}" + ("" if required else " (default: fvq)"))
    group.add_argument("--recipe-file", help="a JSON recipe stating every convention (see fvq_plugin/recipe.py)")


def _add_output_args(parser):
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--output", help="append per-video results to this .jsonl file; an interrupted run resumes "
                                         "(score --engine ray: a folder)")
    parser.add_argument("--csv", help="also write the per-video results as CSV")


def _add_parallel_args(parser):
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding ahead")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads decoding ahead in this process (no worker start-up: for many short videos)")


def _add_runtime_args(parser, weights=True):
    if weights:
        parser.add_argument("--weights", help=f"FVQ-Rater checkpoint folder (default: env {WEIGHTS_ENV})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    # checkpoint.DTYPES, written out so that --help imports no torch
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="backbone weights dtype")
    parser.add_argument("--device-map", help="e.g. auto: shard the backbone over the visible GPUs")
    parser.add_argument("--attn", choices=ATTENTION, help="attention implementation (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per forward")
    _add_parallel_args(parser)
    parser.add_argument("--cache", help="feature cache folder")
    if weights:
        parser.add_argument("--timeout-per-video", type=float, metavar="SECONDS",
                            help="record a video still decoding after this long as failed and go on (decoding then "
                                 "runs in max(1, --workers) processes that can be stopped)")
        parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                            help="fold LoRA into the base weights for inference")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except the empty ones (None, off, none given) and those the help already states."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    defaults = _HelpWithDefaults
    parser = argparse.ArgumentParser(prog="fvq-rater", description="FVQ-Rater face-video quality assessment",
                                     formatter_class=defaults)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser = functools.partial(commands.add_parser, formatter_class=defaults)

    demo = commands.add_parser("demo", help="build the demo face-video set and run the main job on it")
    demo.add_argument("--workdir", default=DEMO_DIR, help="where the demo writes")
    demo.add_argument("--videos", type=int, default=DEFAULT_VIDEOS, help="demo set size")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo set and of training")
    demo.add_argument("--distill", action="store_true",
                      help="then distill the trained rater into fvq_rater_lite and compare the two")
    demo.set_defaults(run=_demo)

    make = commands.add_parser("make-demo-data", help="write an FVQ-20K-layout set of degraded face videos")
    make.add_argument("out", help="output directory (must be empty or absent)")
    make.add_argument("--videos", type=int, default=DEFAULT_VIDEOS, help="number of videos (80/5/15 split)")
    make.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical videos")
    make.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    make.add_argument("--unlabeled", type=int, default=0, metavar="N",
                      help="also N unlabeled videos of the training identities in OUT/unlabeled/videos (for distill)")
    make.set_defaults(run=_make_demo_data)

    check = commands.add_parser("validate", help="check an FVQ-20K-layout dataset, line by line")
    check.add_argument("root", help="FVQ-20K-layout root")
    check.add_argument("--split", choices=["train", "val", "test"], help="only this split (default all)")
    check.add_argument("--deep", action="store_true", help="also open every video")
    check.set_defaults(run=_validate)

    score = commands.add_parser("score", help="score videos (or images) with an FVQ-Rater checkpoint")
    score.add_argument("paths", nargs="*", metavar="PATH",
                       help="video or image files, or folders (searched recursively); or use --manifest, --data")
    score.add_argument("--data", help="score a split of this FVQ-20K-layout root (see --split)")
    score.add_argument("--split", default="test", choices=["train", "val", "test"], help="the --data split")
    score.add_argument("--manifest", help="a .txt, .csv or .parquet list of video paths or URIs (--engine ray)")
    _add_output_args(score)
    score.add_argument("--resume", action="store_true",
                       help="continue the results in --output (the local engine always does; --engine ray asks for it)")
    _add_runtime_args(score)
    _add_feature_args(score)
    cluster = score.add_argument_group("Ray engine")
    cluster.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="ray: a Ray Data pipeline on a cluster (or a local Ray instance); --output is then a folder")
    cluster.add_argument("--address", help="the Ray cluster to join, e.g. auto or ray://HEAD:10001 (default: start a "
                                            "local Ray instance)")
    cluster.add_argument("--prepare-actors", type=int,
                         help="CPU actors decoding and running the face/portrait models (default: the CPUs not rating)")
    cluster.add_argument("--prepare-batch-size", type=int, default=4,
                         help="videos per preparation task (a worker that dies loses its task: up to this many videos)")
    cluster.add_argument("--rate-actors", type=int, help="actors holding the model, one GPU each with --device cuda "
                                                         "(default 1)")
    cluster.add_argument("--gpus-per-rater", type=float, help="GPUs per rating actor (default: 1 with --device cuda, else 0)")
    score.set_defaults(run=_score)

    evaluation = commands.add_parser("eval", help="SRCC/PLCC/KRCC/RMSE on a dataset split")
    evaluation.add_argument("--data", required=True, help="FVQ-20K-layout root")
    evaluation.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate")
    _add_output_args(evaluation)
    _add_runtime_args(evaluation)
    _add_feature_args(evaluation)
    evaluation.set_defaults(run=_eval)

    comparison = commands.add_parser("compare", help="FVQ-Rater and other quality metrics on the same videos: a "
                                                      "table, CSV, JSON and a scatter plot")
    comparison.add_argument("--data", required=True, help="FVQ-20K-layout root")
    comparison.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to compare on")
    comparison.add_argument("--metrics", default="fvq_rater,piqe",
                            help="comma-separated: fvq_rater, viideo and no-reference pyiqa metric names")
    comparison.add_argument("--frames", type=int, default=8, help="frames per video for frame metrics")
    comparison.add_argument("--pool", choices=COMPARE_POOLS, default="mean",
                            help="per-video pooling of frame scores (min: the worst frame)")
    comparison.add_argument("--out", default="fvq-compare", help="folder for compare.csv/.json/.png and predictions")
    comparison.add_argument("--resume", action="store_true",
                            help="reuse the predictions in --out; compute only the missing ones (e.g. a new metric)")
    comparison.add_argument("--metric-weights", action="append", default=[], metavar="NAME=PATH",
                            help="local weights or parameter file of a metric (repeatable)")
    comparison.add_argument("--lmms-eval-samples", action="append", default=[], metavar="[LABEL=]FILE",
                            help="another LMM's logged fvq20k answers (lmms-eval --log_samples), as a column")
    comparison.add_argument("--weights", help=f"FVQ-Rater checkpoint folder (default: env {WEIGHTS_ENV})")
    comparison.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    comparison.add_argument("--batch-size", type=int, default=8, help="FVQ-Rater videos per forward")
    comparison.add_argument("--threads", type=int, default=0,
                            help="threads preparing fvq_rater's and fvq_rater_lite's videos ahead of their models")
    comparison.add_argument("--cache", help="FVQ-Rater's feature cache folder")
    comparison.add_argument("--json", action="store_true", help="print the results as JSON")
    comparison.set_defaults(run=_compare)

    features = commands.add_parser("features", help="precompute the four feature streams of a split into a cache")
    features.add_argument("data", help="FVQ-20K-layout root")
    features.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to extract")
    features.add_argument("--out", required=True, help="cache folder")
    features.add_argument("--weights", help="use the feature configuration of this checkpoint")
    features.add_argument("--image-size", type=int, default=448, help="frame size without --weights")
    features.add_argument("--device", default="cpu", help="where SlowFast runs")
    features.add_argument("--batch-size", type=int, default=8, help="videos per batch")
    _add_parallel_args(features)
    _add_feature_args(features)
    features.set_defaults(run=_features)

    training = commands.add_parser("train", help="train FVQ-Rater (stage 1: level text, stage 2: score head)")
    training.add_argument("--data", required=True, help="FVQ-20K-layout root")
    training.add_argument("--stage", type=int, choices=[1, 2], required=True,
                          help="1: level text (cross-entropy); 2: score head (L1 on MOS/100)")
    training.add_argument("--out", required=True, help="checkpoint folder (best/ and last/ inside)")
    start = training.add_mutually_exclusive_group()
    start.add_argument("--init", help="continue from an FVQ-Rater checkpoint (e.g. stage 1's best)")
    start.add_argument("--backbone", help="new rater on an InternVL checkpoint in transformers' layout")
    _add_recipe_args(training, "new raters")
    training.add_argument("--frames", type=int, help="frames sampled per video (new raters; default: the recipe's)")
    training.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    training.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine schedule)")
    training.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    training.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="accelerate's")
    training.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    training.add_argument("--ce-weight", type=float, default=0.0, help="stage 2: add the level cross-entropy")
    training.add_argument("--key-metric", choices=KEY_METRICS, default=KEY_METRICS[0],
                          help="what best/ keeps: validation SRCC minus RMSE/sd(MOS) (default), or SRCC alone")
    training.add_argument("--lora-r", type=int, default=8, help="LoRA rank (new raters)")
    training.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (new raters)")
    training.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    training.add_argument("--resume", action="store_true", help="continue an interrupted run from --out/last")
    training.add_argument("--overwrite", action="store_true", help="train into a non-empty --out, replacing its checkpoints")
    _add_runtime_args(training, weights=False)
    _add_feature_args(training)
    training.set_defaults(run=_train)

    convert = commands.add_parser("convert", help="released InternVL-chat-layout weights -> an FVQ-Rater checkpoint")
    convert.add_argument("src", help="local folder of the released checkpoint (config.json + *.safetensors)")
    convert.add_argument("dst", help="new checkpoint folder (absent or empty)")
    convert.add_argument("--map", action="append", metavar="SRC_PREFIX=OUR_PREFIX",
                         help="name the release's extra modules, e.g. --map quality_head.=score_head. (repeatable)")
    convert.add_argument("--allow-unmatched", action="store_true",
                         help="write even if some release keys are unused (the report lists them)")
    _add_recipe_args(convert, "the release (finevq: FineVQ's layout; fvq: our reading of FVQ-Rater's paper)",
                     required=True)
    convert.set_defaults(run=_convert)

    distillation = commands.add_parser("distill", help="train the fvq_rater_lite student from an FVQ-Rater teacher "
                                                       "(pseudo-labels, optional self-training)")
    distillation.add_argument("--teacher", help=f"FVQ-Rater checkpoint folder (default: env {WEIGHTS_ENV})")
    distillation.add_argument("--data", required=True, help="FVQ-20K-layout root (train labels, val for selection)")
    distillation.add_argument("--unlabeled", metavar="DIR_OR_LIST",
                              help="videos to pseudo-label: a folder (searched recursively) or a file of paths")
    distillation.add_argument("--out", required=True, help="folder for pseudo-labels, caches and OUT/student")
    distillation.add_argument("--rounds", type=int, default=0,
                              help="self-training rounds: fine-tune the teacher on labels + pseudo-labels, relabel")
    distillation.add_argument("--teacher-epochs", type=int, default=3, help="stage-II epochs per self-training round")
    distillation.add_argument("--student-init", help="start the student from this fvq_rater_lite checkpoint")
    distillation.add_argument("--student-sampling", choices=("leading", "centres"), default="leading",
                              help="the frames the student reads: the clip's first 6, at 80 px (default: they decode "
                                   "in a fraction of the time), or 4 spread over the whole clip, at 112 px")
    distillation.add_argument("--epochs", type=int, default=40, help="student epochs")
    distillation.add_argument("--batch-size", type=int, default=32, help="student batch (teacher: scoring batch)")
    distillation.add_argument("--lr", type=float, default=3e-3, help="student peak learning rate (one-cycle)")
    distillation.add_argument("--rank-weight", type=float, default=1.0, help="weight of the fidelity ranking loss")
    distillation.add_argument("--pseudo-weight", type=float, default=1.0,
                              help="weight of a pseudo-labelled video against a labelled one")
    distillation.add_argument("--cache", help="the teacher's feature cache folder (default: OUT/teacher-features)")
    distillation.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    distillation.add_argument("--json", action="store_true", help="print the report as JSON")
    distillation.set_defaults(run=_distill)

    onnx = commands.add_parser("export-onnx", help="write an fvq_rater_lite student as ONNX, checked with onnxruntime")
    onnx.add_argument("student", help="fvq_rater_lite checkpoint folder (distill's OUT/student)")
    onnx.add_argument("--out", help="the .onnx file (default: STUDENT/fvq_rater_lite.onnx)")
    onnx.set_defaults(run=_export_onnx)

    benchmark = commands.add_parser("bench", help="time the feature and model stages (ratios from one run)")
    benchmark.add_argument("--stage", choices=["features", "model", "lite", "ray"], required=True,
                           help="what to time (lite: FVQ-Rater against its fvq_rater_lite student; ray: score "
                                "--engine ray against the local Scorer)")
    benchmark.add_argument("--teacher", help="lite stage: FVQ-Rater checkpoint (default: a random demo-scale one)")
    benchmark.add_argument("--weights", help="lite stage: fvq_rater_lite checkpoint (default: a random one); ray stage: "
                                             "the checkpoint to score with (default: a random demo-scale FVQ-Rater)")
    benchmark.add_argument("--size", default="tiny", choices=["tiny", "internvl2-1b", "internvl2-8b"],
                           help="model stage: backbone size (random weights; the large ones need --device cuda)")
    benchmark.add_argument("--videos", type=int, help="features, lite and ray stages: videos per measurement "
                                                      "(default 4; ray: 160)")
    benchmark.add_argument("--address", help="ray stage: the Ray cluster to join (default: a local Ray instance)")
    benchmark.add_argument("--threads", type=int, help="lite stage: preparing threads, against none (default: one "
                                                       "per core)")
    benchmark.add_argument("--image-size", type=int, default=448, help="features stage: frame size")
    benchmark.add_argument("--temporal", choices=["finevq", "kinetics"], default="finevq",
                           help="features stage: SlowFast preprocessing (finevq: every frame at 448, the fvq recipe's)")
    benchmark.add_argument("--device", default="cpu", help="where the models run")
    benchmark.add_argument("--out", default="bench.json", help="where the JSON results go")
    benchmark.add_argument("--json", action="store_true", help="print the results as JSON only")
    _add_feature_args(benchmark)
    benchmark.set_defaults(run=_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import InputError
    from .video import VideoReadError

    for stream in (sys.stdout, sys.stderr):
        # A file name that is not UTF-8 is printed with \x escapes instead of ending the run.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        _check_runtime(args)
        return args.run(args)
    # Problems with the user's input or files: one clear line. Anything else is a bug: its traceback stays.
    except (UsageError, InputError, VideoReadError, FileExistsError, FileNotFoundError) as error:
        print(f"fvq-rater {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
