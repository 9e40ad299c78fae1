"""`fvq-rater` command line. Each command imports what it needs, so `--help` stays instant."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_DIR = "fvq-demo"


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


def _demo(args) -> int:
    """The main job on the embedded default: a demo FVQ-20K set built from package-shipped faces."""
    from .data import validate
    from .demo_data import build_demo_set, format_summary, load_summary

    started = time.perf_counter()
    data_dir = Path(args.workdir) / "data"
    summary = load_summary(data_dir, n_videos=args.videos, seed=args.seed)
    if summary is None:
        print(f"Building the demo set in {data_dir} ...")
        summary = build_demo_set(data_dir, n_videos=args.videos, seed=args.seed, overwrite=True)
    else:
        print(f"Reusing the demo set in {data_dir}")
    print(format_summary(summary))
    problems = validate(data_dir, deep=True, progress=False)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"Demo set valid: every label parsed and every video opened ({time.perf_counter() - started:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvq-rater", description="FVQ-Rater face-video quality assessment")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build the demo face-video set and run the main job on it")
    demo.add_argument("--workdir", default=DEMO_DIR, help=f"where the demo writes (default ./{DEMO_DIR})")
    demo.add_argument("--videos", type=int, default=200, help="demo set size (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    make = commands.add_parser("make-demo-data", help="write an FVQ-20K-layout set of degraded face videos")
    make.add_argument("out", help="output directory (must be empty or absent)")
    make.add_argument("--videos", type=int, default=200)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    make.set_defaults(run=_make_demo_data)

    check = commands.add_parser("validate", help="check an FVQ-20K-layout dataset, line by line")
    check.add_argument("root")
    check.add_argument("--split", choices=["train", "val", "test"], help="only this split (default all)")
    check.add_argument("--deep", action="store_true", help="also open every video")
    check.set_defaults(run=_validate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DatasetError
    from .video import VideoReadError

    try:
        return args.run(args)
    except (DatasetError, VideoReadError, FileExistsError, FileNotFoundError) as error:
        print(f"fvq-rater {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
