"""Issue 12 item 4: abusive labels.txt files.

Every abuse gives a problem naming the file and line from `validate`, `read_split` refuses the split, and the loader
never reads a byte outside the dataset root.
"""
import builtins
import io
import os
from pathlib import Path

import pytest

from fvq_plugin.cli import main
from fvq_plugin.data import DatasetError, FVQ20KDataset, parse_labels, read_split, validate

pytestmark = pytest.mark.reliability

VIDEOS = ("a.mp4", "b.mp4", "c.mp4")  # small real files: validate without deep only looks them up
LONG = b"v" * 100_000 + b".mp4"


def _write_videos(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for name in VIDEOS:
        (folder / name).write_bytes(b"\x00\x00\x00\x18ftypmp42")


def _outside_file(root: Path) -> Path:
    secret = root.parent / f"{root.name}-outside" / "secret.mp4"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(b"outside the dataset root")
    return secret


def _video_link_out(root):
    (root / "test" / "videos" / "s.mp4").symlink_to(_outside_file(root))


def _videos_dir_link_out(root):
    outside = _outside_file(root).parent / "videos"
    _write_videos(outside)
    videos = root / "test" / "videos"
    for name in VIDEOS:
        (videos / name).unlink()
    videos.rmdir()
    videos.symlink_to(outside, target_is_directory=True)


def _labels_link_out(root):
    labels = root / "test" / "labels.txt"
    outside = _outside_file(root).parent / "labels.txt"
    outside.write_bytes(labels.read_bytes())
    labels.unlink()
    labels.symlink_to(outside)


def _subdirectory(root):
    (root / "test" / "videos" / "sub").mkdir()


SETUP = {"video_symlink_out": _video_link_out, "videos_dir_symlink_out": _videos_dir_link_out,
         "labels_symlink_out": _labels_link_out, "name_is_directory": _subdirectory}

# (case id, labels.txt bytes (of test, or {split: bytes}), line of the one expected problem or None, message part).
# A None message: the file is accepted and ACCEPTED[case id] lists its (name, mos, line) records.
CASES = [
    ("dotdot_traversal", b"a.mp4,50\n../x.mp4,50\n", 2, "video name '../x.mp4' points outside"),
    ("etc_passwd", b"../../etc/passwd,50\n", 1, "points outside"),
    ("dotdot_inside_subfolder", b"sub/../../x.mp4,50\n", 1, "points outside"),
    ("absolute_posix", b"a.mp4,50\nb.mp4,50\n/etc/passwd,50\n", 3, "'/etc/passwd' points outside"),
    ("absolute_windows", b"C:\\x.mp4,50\n", 1, "points outside"),
    ("windows_drive_relative", b"C:x.mp4,50\n", 1, "points outside"),
    ("windows_rooted", b"\\x.mp4,50\n", 1, "points outside"),
    ("windows_unc", b"\\\\server\\share\\x.mp4,50\n", 1, "points outside"),
    ("backslash_traversal", b"..\\x.mp4,50\n", 1, "points outside"),
    ("video_symlink_out", b"a.mp4,50\ns.mp4,60\n", 2, "video 's.mp4' links outside the dataset root"),
    ("videos_dir_symlink_out", b"a.mp4,50\n", 1, "video 'a.mp4' links outside the dataset root"),
    ("labels_symlink_out", b"a.mp4,50\n", None, "labels file links outside the dataset root"),
    ("duplicate_in_split", b"a.mp4,50\nb.mp4,40\na.mp4,60\n", 3, "duplicate video 'a.mp4' (first on line 1)"),
    ("duplicate_spelled_differently", b"a.mp4,50\n./a.mp4,60\n", 2, "duplicate video './a.mp4' (first on line 1)"),
    ("duplicate_across_splits", {"train": b"a.mp4,50\n", "test": b"b.mp4,1\na.mp4,60\n"}, 2,
     "video 'a.mp4' is also in train (line 1)"),
    ("mos_nan", b"a.mp4,nan\n", 1, "outside 0-100"),
    ("mos_inf", b"a.mp4,inf\n", 1, "outside 0-100"),
    ("mos_minus_inf", b"a.mp4,-inf\n", 1, "outside 0-100"),
    ("mos_negative", b"a.mp4,-1\n", 1, "MOS '-1' of 'a.mp4' is outside 0-100"),
    ("mos_above_100", b"a.mp4,100.5\n", 1, "outside 0-100"),
    ("mos_overflow", b"a.mp4,1e400\n", 1, "outside 0-100"),
    ("mos_100k_digits", b"a.mp4," + b"9" * 100_000 + b"\n", 1, "(100000 characters) of 'a.mp4' is outside 0-100"),
    ("mos_not_numeric", b"a.mp4,high\n", 1, "MOS 'high' of 'a.mp4' is not a number"),
    ("mos_empty", b"a.mp4,\n", 1, "MOS '' of 'a.mp4' is not a number"),
    ("bom", b"\xef\xbb\xbfa.mp4,50\nb.mp4,60\n", None, None),
    ("bom_and_header", b"\xef\xbb\xbfname,mos\na.mp4,50\n", None, None),
    ("crlf", b"a.mp4,50\r\nb.mp4,60\r\nc.mp4\t70\r\n", None, None),
    ("blank_lines", b"\n   \n\t\na.mp4,50\n\r\n \r\nb.mp4,60\n\n", None, None),
    ("blank_lines_count", b"\n \na.mp4,50\n\t\n\r\nx.mp4,101\n", 6, "outside 0-100"),
    ("form_feed_is_not_a_line_break", b"a.mp4,50\n\x0c\nb.mp4,500\n", 3, "outside 0-100"),
    ("very_long_name", b"a.mp4,50\n" + LONG + b",50\n", 2, "(100004 characters) is too long for a file name"),
    ("very_long_line", b"a.mp4,50\nb.mp4,60\n" + b"x" * 100_000 + b"\n", 3, "(100000 characters)"),
    ("name_too_long_for_filesystem", b"a" * 300 + b".mp4,50\n", 1, "is too long for a file name"),
    ("name_too_long_in_utf8_bytes", "é".encode() * 130 + b",50\n", 1, "is too long for a file name"),
    ("non_utf8", b"a.mp4,50\nb\xff.mp4,60\nc.mp4,70\n", 2, "not UTF-8: byte 0xff at column 2"),
    ("latin1_first_line", b"caf\xe9.mp4,50\nb.mp4,60\n", 1, "not UTF-8: byte 0xe9 at column 4"),
    ("nul_byte", b"a.mp4,50\na\x00.mp4,60\n", 2, "video name 'a\\x00.mp4' contains a control character"),
    ("empty_name", b",50\n", 1, "empty video name"),
    ("whitespace_name", b"a.mp4,50\n  ,50\n", 2, "empty video name"),
    ("name_is_directory", b"a.mp4,50\nsub,60\n", 2, "video 'sub' is a directory, not a video file"),
    ("name_is_videos_dir", b".,60\n", 1, "is a directory, not a video file"),
    ("three_fields", b"a.mp4,50,60\n", 1, "expected 'name,mos', got 'a.mp4,50,60'"),
    ("missing_video", b"a.mp4,50\nnope.mp4,60\n", 2, "video 'nope.mp4' not found"),
]
ACCEPTED = {
    "bom": [("a.mp4", 50.0, 1), ("b.mp4", 60.0, 2)],
    "bom_and_header": [("a.mp4", 50.0, 2)],
    "crlf": [("a.mp4", 50.0, 1), ("b.mp4", 60.0, 2), ("c.mp4", 70.0, 3)],
    "blank_lines": [("a.mp4", 50.0, 4), ("b.mp4", 60.0, 7)],
}
# A split read alone cannot know the other splits: only `validate` sees these.
VALIDATE_ONLY = {"duplicate_across_splits"}


def _make(root: Path, case: str, labels) -> tuple[str, ...]:
    files = labels if isinstance(labels, dict) else {"test": labels}
    for split, data in files.items():
        _write_videos(root / split / "videos")
        (root / split / "labels.txt").write_bytes(data)
    if case in SETUP:
        SETUP[case](root)
    return tuple(files)


@pytest.mark.parametrize("case, labels, line, message", CASES, ids=[c[0] for c in CASES])
def test_abusive_labels_give_line_numbered_problems(tmp_path, case, labels, line, message):
    root = tmp_path / "root"
    splits = _make(root, case, labels)
    problems = validate(root, splits=splits, progress=False)
    if message is None:
        assert problems == []
        assert [(r.name, r.mos, r.line) for r in read_split(root, "test")] == ACCEPTED[case]
        return
    labels_file = root / splits[-1] / "labels.txt"
    assert [(p.file, p.line) for p in problems] == [(labels_file, line)], [str(p) for p in problems]
    assert message in problems[0].message
    assert len(problems[0].message) < 400  # quotes are cut short: a 100 kB line is not echoed back
    assert str(problems[0]).startswith(f"{labels_file}:{line}: " if line else f"{labels_file}: ")
    if case in VALIDATE_ONLY:
        assert all(read_split(root, split) for split in splits)
        return
    with pytest.raises(DatasetError, match="1 problem") as raised:
        read_split(root, splits[-1])
    assert raised.value.problems == problems


def test_a_non_utf8_line_costs_that_line_only(tmp_path):
    root = tmp_path / "root"
    _make(root, "non_utf8", b"a.mp4,50\nb\xff.mp4,60\r\nc.mp4,70\n")
    records, problems = parse_labels(root / "test" / "labels.txt")
    assert [(r.name, r.line) for r in records] == [("a.mp4", 1), ("c.mp4", 3)]
    assert [(p.line, "not UTF-8" in p.message) for p in problems] == [(2, True)]


@pytest.fixture
def spy_reads(monkeypatch):
    """Fail any open of `watched` files' bytes; stat, is_file and resolve stay allowed."""
    watched = set()

    def guard(file):
        if isinstance(file, (str, bytes, os.PathLike)) and Path(os.fsdecode(file)).resolve() in watched:
            raise AssertionError(f"the loader read {file}, outside the dataset root")

    def spied(original):
        def spy(file, *args, **kwargs):
            guard(file)
            return original(file, *args, **kwargs)
        return spy

    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, spied(getattr(module, name)))
    for name in ("open", "read_bytes", "read_text"):  # methods: `self` is the file
        monkeypatch.setattr(Path, name, spied(getattr(Path, name)))

    def probe(path, *args, **kwargs):
        guard(path)

    import fvq_plugin.video

    monkeypatch.setattr(fvq_plugin.video, "probe", probe)
    return watched


@pytest.mark.parametrize("case", ["video_symlink_out", "videos_dir_symlink_out", "labels_symlink_out"])
def test_the_loader_never_reads_outside_the_root(tmp_path, spy_reads, case):
    root = tmp_path / "root"
    _make(root, case, b"a.mp4,50\ns.mp4,60\n" if case == "video_symlink_out" else b"a.mp4,50\n")
    outside = root.parent / "root-outside"
    spy_reads.update(p.resolve() for p in outside.rglob("*") if p.is_file())
    with pytest.raises(AssertionError, match="outside the dataset root"):  # the spy does catch a read
        next(p for p in outside.rglob("*") if p.is_file()).read_bytes()
    for deep in (False, True):
        assert [p for p in validate(root, splits=["test"], deep=deep, progress=False) if "links outside" in p.message]
    with pytest.raises(DatasetError, match="links outside"):
        read_split(root, "test")
    with pytest.raises(DatasetError, match="links outside"):
        FVQ20KDataset(root, "test")


def test_cli_validate_prints_file_line_message_and_fails(tmp_path, capsys):
    root = tmp_path / "root"
    _make(root, "abuse", b"\xef\xbb\xbfa.mp4,50\r\n../../etc/passwd,50\r\nb\xff.mp4,1\r\n" + LONG + b",nan\r\n")
    try:
        code = main(["validate", str(root), "--split", "test"])
    except SystemExit as exit:
        code = exit.code
    assert code == 1
    out = capsys.readouterr().out
    labels = root / "test" / "labels.txt"
    assert f"{labels}:2: video name '../../etc/passwd' points outside" in out
    assert f"{labels}:3: not UTF-8" in out
    assert f"{labels}:4: MOS 'nan' of 'vvvv" in out
    assert "3 problem(s)" in out and len(out) < 2000
