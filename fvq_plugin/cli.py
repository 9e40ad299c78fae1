"""`fvq-rater` command line. Each command imports what it needs, so `--help` stays instant."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_DIR = "fvq-demo"
DEFAULT_VIDEOS = 400  # fvq_plugin.demo_data.DEFAULT_VIDEOS, without importing numpy/cv2 for --help


def _make_demo_data(args) -> int:
    from .demo_data import build_demo_set, format_summary

    summary = build_demo_set(args.out, n_videos=args.videos, seed=args.seed, overwrite=args.overwrite)
    print(format_summary(summary))
    return 0


def _validate(args) -> int:
    from .data import SPLITS, validate

    splits = [args.split] if args.split else SPLITS
    problems = validate(args.root, splits=splits, deep=args.deep)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {args.root} ({', '.join(splits)}{', videos opened' if args.deep else ''})")
    return 1 if problems else 0


WEIGHTS_ENV = "FVQ_RATER_WEIGHTS"  # fvq_plugin.model.WEIGHTS_ENV, without importing torch for --help


def _feature_overrides(args) -> dict:
    names = ("video_backend", "face_backend", "face_models", "portrait_model", "temporal_weights")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "temporal_random", False):
        overrides["temporal_random"] = True
    return overrides


def _scorer(args):
    from .model import checkpoint_path, parse_dtype
    from .scoring import Scorer

    return Scorer.from_pretrained(checkpoint_path(args.weights, "--weights DIR"), device=args.device,
                                  dtype=parse_dtype(args.dtype), device_map=args.device_map, attn_implementation=args.attn,
                                  feature_overrides=_feature_overrides(args), batch_size=args.batch_size,
                                  workers=args.workers, cache_dir=args.cache)


def _score(args) -> int:
    results = _scorer(args).score(args.paths, output=args.output, progress=not args.json)
    _maybe_csv(results, args.csv)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            shown = f"{result['score']:6.2f}  {result['level']:<9}" if "score" in result else f"error: {result['error']}"
            print(f"{shown}  {result['path']}")
    return 1 if any("error" in r for r in results) else 0


def _maybe_csv(results, path):
    if path:
        from .scoring import write_csv

        write_csv(results, path)


def _eval(args) -> int:
    from .scoring import evaluate

    report, results = evaluate(_scorer(args), args.data, args.split, output=args.output)
    _maybe_csv(results, args.csv)
    for result in results:
        if "error" in result:
            print(f"failed: {result['path']}: {result['error']}")
    print(json.dumps(report) if args.json else
          f"{args.split}: SRCC {report['srcc']:.4f}  PLCC {report['plcc']:.4f}  KRCC {report['krcc']:.4f}  "
          f"RMSE {report['rmse']:.3f}  ({report['scored']} scored, {report['failed']} failed)")
    return 0


def _features(args) -> int:
    from .features import FeatureConfig, FeatureExtractor
    from .scoring import split_features

    if args.weights:  # the feature configuration the checkpoint was trained with
        from .model import CONFIG_FILE

        config = json.loads((Path(args.weights) / CONFIG_FILE).read_text())["features"]
    else:
        config = {"image_size": args.image_size}
    extractor = FeatureExtractor(FeatureConfig.from_dict({**config, **_feature_overrides(args)}), device=args.device)
    features, _, failures = split_features(args.data, args.split, extractor, args.out, args.batch_size, args.workers)
    for failure in failures:
        print(f"failed: {failure['path']}: {failure['error']}")
    print(f"{len(features)} videos' features cached in {Path(args.out) / extractor.key_digest()}, {len(failures)} failed")
    return 1 if failures else 0


def _train(args) -> int:
    from .features import FeatureConfig, FeatureExtractor
    from .model import FVQRater, FVQRaterConfig, LoraSettings, load_backbone, parse_dtype
    from .scoring import split_features
    from .tiny import tiny_rater
    from .train import TrainConfig, train

    if args.init:
        model = FVQRater.from_pretrained(args.init, trainable=True, dtype=parse_dtype(args.dtype))
        features = FeatureConfig.from_dict({**model.config.features, **_feature_overrides(args)})
        extractor = FeatureExtractor(features, device=args.device)
    else:
        lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha)
        vlm = tokenizer = None
        image_size = 64  # the tiny random backbone's
        if args.backbone:
            vlm, tokenizer = load_backbone(args.backbone, dtype=parse_dtype(args.dtype), attn_implementation=args.attn)
            image_size = vlm.config.vision_config.image_size
            image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        features = FeatureConfig.from_dict({"image_size": image_size, "num_frames": args.frames,
                                            **_feature_overrides(args)})
        extractor = FeatureExtractor(features, device=args.device)
        if vlm is None:
            model = tiny_rater(extractor, args.seed, lora=lora)
        else:
            config = FVQRaterConfig(num_frames=args.frames, face_dim=extractor.face_dim, lora=lora,
                                    features=features.to_dict())
            model = FVQRater.create(config, vlm, tokenizer, base_path=args.backbone)
    train_set = split_features(args.data, "train", extractor, args.cache, args.batch_size, args.workers)
    val_set = split_features(args.data, "val", extractor, args.cache, args.batch_size, args.workers)
    config = TrainConfig(stage=args.stage, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         grad_accum=args.grad_accum, mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing, ce_weight=args.ce_weight, seed=args.seed)
    result = train(model, extractor.preparer.spatial, train_set[:2], val_set[:2], config, args.out, resume=args.resume)
    print(f"best validation SRCC {result['best_srcc']:.4f}; checkpoints in {args.out}/best and {args.out}/last")
    return 0


def _convert(args) -> int:
    from .convert import main_convert

    return main_convert(args.src, args.dst, args.map or [], allow_unmatched=args.allow_unmatched)


def _bench(args) -> int:
    from . import bench

    if args.stage == "features":
        from .features import FeatureConfig

        config = FeatureConfig.from_dict({"temporal_random": True, "image_size": args.image_size,
                                          **_feature_overrides(args)})
        result = bench.bench_features(config, videos=args.videos, device=args.device)
        print(bench.format_features(result))
    else:
        result = bench.bench_model(args.size, device=args.device)
        print(bench.format_model(result))
    bench.save(result, args.out)
    print(f"saved {args.out}")
    return 0


def _demo(args) -> int:
    """The main job on the embedded default (see fvq_plugin.demo)."""
    from .demo import DemoSettings, run_demo

    run_demo(args.workdir, DemoSettings(videos=args.videos, seed=args.seed))
    return 0


def _add_feature_args(parser):
    group = parser.add_argument_group("feature extractors")
    group.add_argument("--video-backend", choices=["auto", "pyav", "decord"])
    group.add_argument("--face-backend", choices=["yunet-sface", "insightface"])
    group.add_argument("--face-models", help="insightface model folder (default: env FVQ_FACE_MODELS)")
    group.add_argument("--portrait-model", help="a .tflite person-segmentation model (default: the shipped one)")
    group.add_argument("--temporal-weights", help="SlowFast-R50 Kinetics checkpoint (.pyth)")
    group.add_argument("--temporal-random", action="store_true", help="random SlowFast weights (testing only)")


def _add_output_args(parser):
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--output", help="append per-video results to this .jsonl file; an interrupted run resumes")
    parser.add_argument("--csv", help="also write the per-video results as CSV")


def _add_runtime_args(parser, weights=True):
    if weights:
        parser.add_argument("--weights", help=f"FVQ-Rater checkpoint folder (default: env {WEIGHTS_ENV})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")  # model.DTYPES
    parser.add_argument("--device-map", help="e.g. auto: shard the backbone over the visible GPUs")
    parser.add_argument("--attn", help="attention implementation: sdpa, flash_attention_2, eager")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding ahead (default 0)")
    parser.add_argument("--cache", help="feature cache folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvq-rater", description="FVQ-Rater face-video quality assessment")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build the demo face-video set and run the main job on it")
    demo.add_argument("--workdir", default=DEMO_DIR, help=f"where the demo writes (default ./{DEMO_DIR})")
    demo.add_argument("--videos", type=int, default=DEFAULT_VIDEOS, help=f"demo set size (default {DEFAULT_VIDEOS})")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    make = commands.add_parser("make-demo-data", help="write an FVQ-20K-layout set of degraded face videos")
    make.add_argument("out", help="output directory (must be empty or absent)")
    make.add_argument("--videos", type=int, default=DEFAULT_VIDEOS)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    make.set_defaults(run=_make_demo_data)

    check = commands.add_parser("validate", help="check an FVQ-20K-layout dataset, line by line")
    check.add_argument("root")
    check.add_argument("--split", choices=["train", "val", "test"], help="only this split (default all)")
    check.add_argument("--deep", action="store_true", help="also open every video")
    check.set_defaults(run=_validate)

    score = commands.add_parser("score", help="score videos (or images) with an FVQ-Rater checkpoint")
    score.add_argument("paths", nargs="+")
    _add_output_args(score)
    _add_runtime_args(score)
    _add_feature_args(score)
    score.set_defaults(run=_score)

    evaluation = commands.add_parser("eval", help="SRCC/PLCC/KRCC/RMSE on a dataset split")
    evaluation.add_argument("--data", required=True, help="FVQ-20K-layout root")
    evaluation.add_argument("--split", default="test", choices=["train", "val", "test"])
    _add_output_args(evaluation)
    _add_runtime_args(evaluation)
    _add_feature_args(evaluation)
    evaluation.set_defaults(run=_eval)

    features = commands.add_parser("features", help="precompute the four feature streams of a split into a cache")
    features.add_argument("data", help="FVQ-20K-layout root")
    features.add_argument("--split", default="test", choices=["train", "val", "test"])
    features.add_argument("--out", required=True, help="cache folder")
    features.add_argument("--weights", help="use the feature configuration of this checkpoint")
    features.add_argument("--image-size", type=int, default=448)
    features.add_argument("--device", default="cpu")
    features.add_argument("--batch-size", type=int, default=8)
    features.add_argument("--workers", type=int, default=0)
    _add_feature_args(features)
    features.set_defaults(run=_features)

    training = commands.add_parser("train", help="train FVQ-Rater (stage 1: level text, stage 2: score head)")
    training.add_argument("--data", required=True, help="FVQ-20K-layout root")
    training.add_argument("--stage", type=int, choices=[1, 2], required=True)
    training.add_argument("--out", required=True, help="checkpoint folder (best/ and last/ inside)")
    start = training.add_mutually_exclusive_group()
    start.add_argument("--init", help="continue from an FVQ-Rater checkpoint (e.g. stage 1's best)")
    start.add_argument("--backbone", help="new rater on an InternVL checkpoint in transformers' layout")
    training.add_argument("--frames", type=int, default=8)
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--lr", type=float, default=2e-4)
    training.add_argument("--grad-accum", type=int, default=1)
    training.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    training.add_argument("--gradient-checkpointing", action="store_true")
    training.add_argument("--ce-weight", type=float, default=0.0, help="stage 2: add the level cross-entropy")
    training.add_argument("--lora-r", type=int, default=8)
    training.add_argument("--lora-alpha", type=int, default=16)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--resume", action="store_true", help="continue an interrupted run from --out/last")
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
    convert.set_defaults(run=_convert)

    benchmark = commands.add_parser("bench", help="time the feature and model stages (ratios from one run)")
    benchmark.add_argument("--stage", choices=["features", "model"], required=True)
    benchmark.add_argument("--size", default="tiny", choices=["tiny", "internvl2-1b", "internvl2-8b"],
                           help="model stage: backbone size (random weights; the large ones need --device cuda)")
    benchmark.add_argument("--videos", type=int, default=4, help="features stage: videos per measurement")
    benchmark.add_argument("--image-size", type=int, default=448)
    benchmark.add_argument("--device", default="cpu")
    benchmark.add_argument("--out", default="bench.json", help="where the JSON results go")
    _add_feature_args(benchmark)
    benchmark.set_defaults(run=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DatasetError
    from .model import CheckpointError
    from .video import VideoReadError

    try:
        return args.run(args)
    # Problems with the user's input or files: one clear line, no traceback.
    except (DatasetError, VideoReadError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"fvq-rater {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
