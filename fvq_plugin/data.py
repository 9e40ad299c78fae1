"""FVQ-20K on disk: `ROOT/{train,val,test}/labels.txt` (`name,mos` per line) and `videos/`.

Labels may be comma, tab or whitespace separated and may start with a header line.
Every problem is reported with its file and line, so a broken line in a 20,000-video set can be
found and fixed instead of being skipped silently.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from torch.utils.data import Dataset

from .errors import InputError

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.txt"
VIDEOS_DIR = "videos"
MOS_RANGE = (0.0, 100.0)
_HEADER_NAMES = {"name", "video", "video_name", "filename", "file"}
_HEADER_SCORES = {"mos", "score", "label", "quality"}


@dataclass(frozen=True)
class Record:
    name: str
    mos: float
    path: Path
    line: int


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int | None
    message: str

    def __str__(self):
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        return f"{where}: {self.message}"


class DatasetError(InputError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{shown}{more}")


def labels_path(root: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(root) / split / LABELS_FILE


def _fields(line: str) -> list[str]:
    return [f.strip() for f in line.split(",")] if "," in line else line.split()


def _is_header(fields: list[str]) -> bool:
    return len(fields) == 2 and fields[0].lower() in _HEADER_NAMES and fields[1].lower() in _HEADER_SCORES


def _escapes(name: str) -> bool:
    """True for names that would point outside the split's videos/ folder."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or ".." in parts


def parse_labels(path: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """Records of one labels file and the problems found in it (video files are not checked)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        return [], [Problem(path, None, f"cannot read labels: {error}")]
    videos = path.parent / VIDEOS_DIR
    records, problems, first_line = [], [], {}
    data_lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for position, (number, line) in enumerate(data_lines):
        fields = _fields(line)
        if position == 0 and _is_header(fields):
            continue
        if len(fields) != 2:
            problems.append(Problem(path, number, f"expected 'name,mos', got {line.strip()!r}"))
            continue
        name, mos_text = fields
        try:
            mos = float(mos_text)
        except ValueError:
            problems.append(Problem(path, number, f"MOS {mos_text!r} of {name!r} is not a number"))
            continue
        if not (math.isfinite(mos) and MOS_RANGE[0] <= mos <= MOS_RANGE[1]):
            problems.append(Problem(path, number, f"MOS {mos_text} of {name!r} is outside {MOS_RANGE[0]:g}-{MOS_RANGE[1]:g}"))
            continue
        if _escapes(name):
            problems.append(Problem(path, number, f"video name {name!r} points outside {videos}"))
            continue
        if name in first_line:
            problems.append(Problem(path, number, f"duplicate video {name!r} (first on line {first_line[name]})"))
            continue
        first_line[name] = number
        records.append(Record(name, mos, videos / name, number))
    if not records and not problems:
        problems.append(Problem(path, None, "no videos listed"))
    return records, problems


def read_split(root: str | os.PathLike, split: str = "test") -> list[Record]:
    """The split's records; raises DatasetError listing every problem, missing videos included."""
    path = labels_path(root, split)
    if not path.is_file():
        raise DatasetError([Problem(path, None, "labels file not found")])
    records, problems = parse_labels(path)
    problems += _missing_videos(path, records)
    if problems:
        raise DatasetError(problems)
    return records


def _missing_videos(labels: Path, records: list[Record]) -> list[Problem]:
    """Listed videos that are absent, or that a symlink takes outside the dataset root."""
    root = labels.parent.parent.resolve()
    problems = []
    for record in records:
        if not record.path.is_file():
            problems.append(Problem(labels, record.line, f"video {record.name!r} not found at {record.path}"))
        elif not record.path.resolve().is_relative_to(root):
            problems.append(Problem(labels, record.line, f"video {record.name!r} links outside the dataset root "
                                                         f"{root}: {record.path.resolve()}"))
    return problems


def validate(root: str | os.PathLike, splits=SPLITS, deep: bool = False, progress: bool = True) -> list[Problem]:
    """Every problem of the dataset at `root`; `deep` also opens each video."""
    problems, seen = [], {}
    for split in splits:
        path = labels_path(root, split)
        if not path.is_file():
            problems.append(Problem(path, None, "labels file not found"))
            continue
        records, split_problems = parse_labels(path)
        problems += split_problems + _missing_videos(path, records)
        for record in records:
            if record.name in seen:
                other_split, other_line = seen[record.name]
                problems.append(Problem(path, record.line, f"video {record.name!r} is also in {other_split} (line {other_line})"))
            seen[record.name] = (split, record.line)
        if deep:
            problems += _unreadable_videos(path, [r for r in records if r.path.is_file()], progress)
    return problems


def _unreadable_videos(labels: Path, records: list[Record], progress: bool) -> list[Problem]:
    from tqdm.auto import tqdm

    from .video import VideoReadError, probe

    problems = []
    for record in tqdm(records, desc=f"checking {labels.parent.name} videos", disable=not progress, unit="video"):
        try:
            probe(record.path)
        except VideoReadError as error:
            problems.append(Problem(labels, record.line, f"unreadable video: {error.reason}"))
    return problems


class FVQ20KDataset(Dataset):
    """One split as a torch Dataset of (video path, MOS, name)."""

    def __init__(self, root: str | os.PathLike, split: str = "test"):
        self.root, self.split = Path(root), split
        self.records = read_split(root, split)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        return str(record.path), record.mos, record.name
