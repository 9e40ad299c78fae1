from pathlib import Path

import numpy as np
import pytest

from fvq_plugin.cli import main
from fvq_plugin.data import SPLITS, DatasetError, FVQ20KDataset, parse_labels, read_split, validate
from fvq_plugin.video import write_video


def make_split(root: Path, split: str, labels: str, videos=()):
    folder = root / split / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    (root / split / "labels.txt").write_text(labels)
    frames = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    for name in videos:
        write_video(folder / name, frames)


@pytest.fixture
def dataset(tmp_path):
    make_split(tmp_path, "train", "a.mp4,10\nb.mp4,55.5\n", ["a.mp4", "b.mp4"])
    make_split(tmp_path, "val", "c.mp4\t70\n", ["c.mp4"])
    make_split(tmp_path, "test", "name,mos\nd.mp4 99.25\n\ne.mp4, 0\n", ["d.mp4", "e.mp4"])
    return tmp_path


def test_valid_dataset_in_all_separators_and_header(dataset):
    assert validate(dataset, progress=False) == []
    assert [(r.name, r.mos, r.line) for r in read_split(dataset, "test")] == [("d.mp4", 99.25, 2), ("e.mp4", 0.0, 4)]
    assert main(["validate", str(dataset)]) == 0


def test_dataset_yields_path_mos_name(dataset):
    items = list(FVQ20KDataset(dataset, "train"))
    assert items == [(str(dataset / "train/videos/a.mp4"), 10.0, "a.mp4"), (str(dataset / "train/videos/b.mp4"), 55.5, "b.mp4")]


BROKEN = """a.mp4,10
b.mp4,high
c.mp4,101
d.mp4,-3
e.mp4,nan
../escape.mp4,50
/abs/f.mp4,50
a.mp4,20
just-a-name
g.mp4,1,2
missing.mp4,40
"""
EXPECTED = {
    2: "not a number", 3: "outside 0-100", 4: "outside 0-100", 5: "outside 0-100", 6: "points outside",
    7: "points outside", 8: "duplicate video 'a.mp4' (first on line 1)", 9: "expected 'name,mos'",
    10: "expected 'name,mos'", 11: "not found",
}


def test_every_broken_line_is_reported_with_file_and_line(tmp_path):
    make_split(tmp_path, "test", BROKEN, ["a.mp4"])
    labels = tmp_path / "test" / "labels.txt"
    records, problems = parse_labels(labels)
    assert [r.name for r in records] == ["a.mp4", "missing.mp4"]
    problems = validate(tmp_path, splits=["test"], progress=False)
    assert {p.line for p in problems} == set(EXPECTED)
    for problem in problems:
        assert problem.file == labels
        assert EXPECTED[problem.line] in problem.message
        assert str(problem).startswith(f"{labels}:{problem.line}: ")
    with pytest.raises(DatasetError, match="10 problem"):
        read_split(tmp_path, "test")


def test_cli_reports_line_by_line_and_fails(tmp_path, capsys):
    make_split(tmp_path, "test", BROKEN, ["a.mp4"])
    assert main(["validate", str(tmp_path), "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'test' / 'labels.txt'}:2: MOS 'high' of 'b.mp4' is not a number" in out
    assert "10 problem(s)" in out


def test_missing_split_and_cross_split_duplicates(tmp_path):
    make_split(tmp_path, "train", "a.mp4,10\n", ["a.mp4"])
    make_split(tmp_path, "test", "a.mp4,12\n", ["a.mp4"])
    messages = [str(p) for p in validate(tmp_path, progress=False)]
    assert any("val/labels.txt: labels file not found" in m for m in messages)
    assert any("test/labels.txt:1: video 'a.mp4' is also in train (line 1)" in m for m in messages)


def test_deep_validation_opens_videos(dataset):
    (dataset / "test" / "videos" / "d.mp4").write_bytes(b"not a video at all")
    assert validate(dataset, splits=["train"], deep=True, progress=False) == []
    problems = validate(dataset, splits=["test"], deep=True, progress=False)
    assert [(p.line, "unreadable video" in p.message) for p in problems] == [(2, True)]


def test_unknown_split_is_rejected(dataset):
    with pytest.raises(ValueError, match="unknown split"):
        read_split(dataset, "dev")
    assert SPLITS == ("train", "val", "test")


@pytest.mark.reliability
def test_a_symlink_out_of_the_dataset_root_is_a_problem_never_read(dataset, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.mp4"
    outside.write_bytes((dataset / "test" / "videos" / "d.mp4").read_bytes())
    (dataset / "test" / "videos" / "e.mp4").unlink()
    (dataset / "test" / "videos" / "e.mp4").symlink_to(outside)
    problems = [str(p) for p in validate(dataset, splits=["test"], progress=False)]
    assert len(problems) == 1 and "labels.txt:4: video 'e.mp4' links outside the dataset root" in problems[0]
    with pytest.raises(DatasetError, match="links outside"):
        read_split(dataset, "test")
