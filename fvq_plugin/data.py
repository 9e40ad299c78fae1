"""FVQ-20K on disk: `ROOT/{train,val,test}/labels.txt` (`name,mos` per line) and `videos/`.

Labels may be comma, tab or whitespace separated and may start with a header line.
Every problem is reported with its file and line, so a broken line in a 20,000-video set can be
found and fixed instead of being skipped silently. Names are kept inside the split's videos/ folder and
the loader never opens a file (labels or video) that a symlink takes outside the dataset root.
"""
from __future__ import annotations

import codecs
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
# Longer names cannot exist (ext4, APFS and NTFS allow 255 per folder level, Linux 4096 per path), and looking
# one up fails with an OSError rather than "not found": they are reported as too long instead.
_NAME_MAX_BYTES, _PATH_MAX_BYTES = 255, 4096
_QUOTE_MAX = 80


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


def _quote(text: str) -> str:
    """repr of `text`, cut short: a 100 kB line must not become a 100 kB message."""
    if len(text) <= _QUOTE_MAX:
        return repr(text)
    return f"{text[:_QUOTE_MAX]!r}... ({len(text)} characters)"


def _escapes(name: str, parts: tuple) -> bool:
    """True for names that would point outside the split's videos/ folder (`parts`: the name split at / and \\)."""
    # Any Windows drive or root counts, not only absolute paths: `C:x.mp4` and `\\x.mp4` leave videos/ there.
    return PurePosixPath(name).is_absolute() or bool(PureWindowsPath(name).anchor) or ".." in parts


def _name_problem(name: str, videos: Path) -> str | None:
    """Why `name` cannot be a video file inside `videos`, or None."""
    if not name:
        return "empty video name"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        # A NUL cannot be in a file name, and other control characters garble the terminal the name is printed on.
        return f"video name {_quote(name)} contains a control character"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if _escapes(name, parts):
        return f"video name {_quote(name)} points outside {videos}"
    longest = max((len(part.encode()) for part in parts), default=0)
    if len(name.encode()) > _PATH_MAX_BYTES or longest > _NAME_MAX_BYTES:
        return f"video name {_quote(name)} is too long for a file name ({_NAME_MAX_BYTES} bytes at most)"
    return None


def _lines(path: Path, data: bytes) -> tuple[list[tuple[int, str]], list[Problem]]:
    """Numbered non-blank lines of a labels file, and a problem for each line that is not UTF-8.

    Lines are decoded one by one so that a stray byte costs its line, not the file. bytes.splitlines breaks only at
    \\n, \\r\\n and \\r, so numbers match an editor's (str.splitlines also breaks at form feeds, \\x1c, \\u2028...).
    """
    lines, problems = [], []
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte, column = raw[error.start], error.start + 1
            message = f"not UTF-8: byte 0x{byte:02x} at column {column} (save the file as UTF-8)"
            problems.append(Problem(path, number, message))
            continue
        if line.strip():
            lines.append((number, line))
    return lines, problems


def parse_labels(path: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """Records of one labels file and the problems found in it (video files are not checked)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        return [], [Problem(path, None, f"cannot read labels: {error.strerror or error}")]
    videos = path.parent / VIDEOS_DIR
    records, first_line = [], {}
    data_lines, problems = _lines(path, data)
    for position, (number, line) in enumerate(data_lines):
        fields = _fields(line)
        if position == 0 and _is_header(fields):
            continue
        if len(fields) != 2:
            problems.append(Problem(path, number, f"expected 'name,mos', got {_quote(line.strip())}"))
            continue
        name, mos_text = fields
        try:
            mos = float(mos_text)
        except ValueError:
            problems.append(Problem(path, number, f"MOS {_quote(mos_text)} of {_quote(name)} is not a number"))
            continue
        if not (math.isfinite(mos) and MOS_RANGE[0] <= mos <= MOS_RANGE[1]):
            problems.append(Problem(path, number, f"MOS {_quote(mos_text)} of {_quote(name)} is outside "
                                                  f"{MOS_RANGE[0]:g}-{MOS_RANGE[1]:g}"))
            continue
        message = _name_problem(name, videos)
        if message:
            problems.append(Problem(path, number, message))
            continue
        # Keyed by the path, not the text: `./a.mp4` and `a.mp4/` are the same video as `a.mp4`.
        key = Path(name)
        if key in first_line:
            problems.append(Problem(path, number, f"duplicate video {_quote(name)} (first on line {first_line[key]})"))
            continue
        first_line[key] = number
        records.append(Record(name, mos, videos / name, number))
    if not records and not problems:
        problems.append(Problem(path, None, "no videos listed"))
    problems.sort(key=lambda problem: problem.line or 0)
    return records, problems


def _labels_problem(path: Path) -> Problem | None:
    """A labels file that is absent, or that a symlink takes outside the dataset root (it is then never read)."""
    if not path.is_file():
        return Problem(path, None, "labels file not found")
    root, target = path.parent.parent.resolve(), path.resolve()
    if not target.is_relative_to(root):
        return Problem(path, None, f"labels file links outside the dataset root {root}: {target}")
    return None


def read_split(root: str | os.PathLike, split: str = "test") -> list[Record]:
    """The split's records; raises DatasetError listing every problem, missing videos included."""
    path = labels_path(root, split)
    problem = _labels_problem(path)
    if problem:
        raise DatasetError([problem])
    records, problems = parse_labels(path)
    problems += _missing_videos(path, records)
    if problems:
        raise DatasetError(problems)
    return records


def _missing_videos(labels: Path, records: list[Record]) -> list[Problem]:
    """Listed videos that are absent, not files, or that a symlink takes outside the dataset root."""
    root = labels.parent.parent.resolve()
    problems = []
    for record in records:
        message = _video_problem(record, root)
        if message:
            problems.append(Problem(labels, record.line, message))
    return problems


def _video_problem(record: Record, root: Path) -> str | None:
    # Only stat and resolve: the bytes of a video outside the root are never opened.
    name = _quote(record.name)
    try:
        if record.path.is_dir():
            return f"video {name} is a directory, not a video file"
        if not record.path.is_file():
            return f"video {name} not found at {record.path}"
        target = record.path.resolve()
    except OSError as error:  # a path the system refuses to look up (too long, permission denied...)
        return f"cannot look up video {name}: {error.strerror or error}"
    if not target.is_relative_to(root):
        return f"video {name} links outside the dataset root {root}: {target}"
    return None


def validate(root: str | os.PathLike, splits=SPLITS, deep: bool = False, progress: bool = True) -> list[Problem]:
    """Every problem of the dataset at `root`; `deep` also opens each video."""
    problems, seen = [], {}
    for split in splits:
        path = labels_path(root, split)
        problem = _labels_problem(path)
        if problem:
            problems.append(problem)
            continue
        records, split_problems = parse_labels(path)
        video_problems = _missing_videos(path, records)
        problems += split_problems + video_problems
        for record in records:
            key = Path(record.name)
            if key in seen:
                other_split, other_line = seen[key]
                problems.append(Problem(path, record.line, f"video {_quote(record.name)} is also in {other_split} "
                                                           f"(line {other_line})"))
            seen[key] = (split, record.line)
        if deep:
            # Only videos that passed the checks above: one linked out of the root is reported, never decoded.
            flagged = {problem.line for problem in video_problems}
            problems += _unreadable_videos(path, [r for r in records if r.line not in flagged], progress)
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
