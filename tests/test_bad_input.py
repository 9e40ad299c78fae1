"""Issue 12 item 3: every entry point on the bad-input corpus (tests/bad_inputs.py).

Each file either gets a valid score carrying exactly the expected flags, or a clear error that names
the file and the cause; a batch records the failure and goes on with the other files.
"""
import csv
import json
import os
import warnings

import pytest

import fvq_plugin.common
from fvq_plugin.cli import main
from fvq_plugin.scoring import Scorer
from fvq_plugin.video import VideoReadError

from bad_inputs import build_corpus

pytestmark = pytest.mark.reliability
# Names a labels.txt cannot list: a folder is a dataset problem of its own (test below), and
# labels.txt is UTF-8, so a name that is not UTF-8 cannot be written in it.
NOT_IN_LABELS = ("a directory", "a non-UTF-8 file name")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The corpus as the test split of an FVQ-20K root (and the cases, by name)."""
    root = tmp_path_factory.mktemp("bad-inputs") / "data"
    cases = build_corpus(root / "test" / "videos")
    lines = [f"{path.name},50" for name, (path, _) in cases.items() if name not in NOT_IN_LABELS]
    (root / "test" / "labels.txt").write_text("\n".join(lines) + "\n")
    return root, cases


@pytest.fixture(autouse=True)
def unreadable(dataset, monkeypatch):
    """Root reads any file whatever its permission bits, so there the file is made unreadable where the
    scorer first opens it (hashing its bytes) instead."""
    path = str(dataset[1]["an unreadable file"][0])
    if os.geteuid() == 0:
        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == path:
                raise PermissionError(13, "Permission denied", path)
            return open(file, *args, **kwargs)

        monkeypatch.setattr(fvq_plugin.common, "open", refusing_open, raising=False)


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return Scorer.from_pretrained(checkpoint)


def check(result, name, path, expected):
    """One result (a Scorer/JSONL result) against the corpus's expectation for `name`."""
    assert result["path"] == str(path), name
    kind, detail = expected
    if kind == "score":
        assert "error" not in result and 0 <= result["score"] <= 100, (name, result)
        assert set(result["flags"]) == detail, (name, result["flags"])
    else:
        assert "score" not in result and detail in result["error"], (name, result.get("error"))


def test_bad_input_scorer_scores_or_explains_every_file_and_goes_on(dataset, scorer, tmp_path):
    _, cases = dataset
    results = scorer.score([path for path, _ in cases.values()], output=tmp_path / "results.jsonl", progress=False)
    assert len(results) == len(cases)
    for (name, (path, expected)), result in zip(cases.items(), results):
        check(result, name, path, expected)
    # Every result, failures included, is in the results file; a rerun scores nothing again.
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == [str(path) for path, _ in cases.values()]
    scorer.score([path for path, _ in cases.values()], output=tmp_path / "results.jsonl", progress=False)
    unhashable = [r for r in results if r["content"] is None]  # bytes unreadable: tried again, never trusted
    assert {r["error"] for r in unhashable} == {"empty file", "is a directory, not a video file",
                                                "cannot read file: Permission denied"}
    assert scorer.resumed == len(cases) - len(unhashable)


def test_bad_input_cli_score_writes_every_result_and_exits_1(dataset, checkpoint, tmp_path, capsys):
    _, cases = dataset
    # `fvq-rater score FOLDER` scores the videos in it: a folder with none is a usage error of its own (below).
    cases = {name: case for name, case in cases.items() if name != "a directory"}
    paths = [str(path) for path, _ in cases.values()]
    code = main(["score", *paths, "--weights", str(checkpoint), "--output", str(tmp_path / "r.jsonl"),
                 "--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert code == 1
    results = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    for (name, (path, expected)), result in zip(cases.items(), results):
        check(result, name, path, expected)
    failed = sum(kind == "error" for _, (kind, _) in cases.values())
    assert f"{len(cases) - failed} scored, {failed} failed" in out
    assert "caf\\udce9-latin1-name.mp4" in out  # a name that is not UTF-8 is printed escaped
    assert "[no_face]" in out and "error: empty file" in out
    with open(tmp_path / "r.csv", encoding="utf-8", errors="surrogateescape", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == paths  # the file's own bytes, non-UTF-8 name included
    assert {row["flags"] for row in rows} >= {"no_face", "repeated_frames", "multiple_faces"}


def test_bad_input_cli_score_of_a_folder_without_videos_names_it(dataset, checkpoint, capsys):
    folder = dataset[1]["a directory"][0]
    assert main(["score", str(folder), "--weights", str(checkpoint)]) == 2
    assert f"{folder}: no video or image files in this folder" in capsys.readouterr().err


def test_bad_input_cli_eval_reports_failures_and_exits_1(dataset, checkpoint, capsys):
    root, cases = dataset
    code = main(["eval", "--data", str(root), "--split", "test", "--weights", str(checkpoint)])
    captured = capsys.readouterr()
    assert code == 1
    listed = {name: case for name, case in cases.items() if name not in NOT_IN_LABELS}
    errors = [path for path, (kind, _) in listed.values() if kind == "error"]
    assert f"({len(listed) - len(errors)} scored, {len(errors)} failed)" in captured.out
    for path in errors:
        assert f"failed: {path}: " in captured.err


def test_bad_input_a_folder_listed_in_labels_is_a_dataset_problem(dataset, checkpoint, tmp_path, capsys):
    import shutil

    root, cases = dataset
    copy = tmp_path / "data"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("unreadable.mp4"))
    with open(copy / "test" / "labels.txt", "a") as labels:
        labels.write(f"{cases['a directory'][0].name},50\n")
    code = main(["eval", "--data", str(copy), "--split", "test", "--weights", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "labels.txt:" in err and "folder.mp4" in err


@pytest.fixture(scope="module")
def metric(checkpoint):
    import pyiqa

    return pyiqa.create_metric("fvq_rater", device="cpu", pretrained_model_path=str(checkpoint))


def test_bad_input_pyiqa_scores_with_flag_warnings_or_raises_naming_the_file(dataset, metric):
    _, cases = dataset
    for name, (path, (kind, detail)) in cases.items():
        if kind == "score":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                score = metric(str(path))
            assert 0 <= score.item() <= 100, name
            flagged = [str(w.message) for w in caught if "scored with flags" in str(w.message)]
            assert bool(flagged) == bool(detail), (name, flagged)
            assert all(flag in flagged[0] for flag in detail), (name, flagged)
        else:
            with pytest.raises(VideoReadError) as error:
                metric(str(path))
            assert str(path) in str(error.value) and detail in str(error.value), name


def test_bad_input_pyiqa_batch_error_names_every_failed_file(dataset, metric):
    _, cases = dataset
    with pytest.raises(VideoReadError) as error:
        metric([str(path) for path, _ in cases.values()])
    failed = [path for path, (kind, _) in cases.values() if kind == "error"]
    assert f"{len(failed)} of {len(cases)} videos" in str(error.value)
    for path in failed:
        assert str(path) in str(error.value)


def test_bad_input_lmms_eval_counts_failures_and_scores_the_rest(dataset, checkpoint):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    root, cases = dataset
    listed = {name: case for name, case in cases.items() if name not in NOT_IN_LABELS}
    output = simple_evaluate(model="fvq_rater", model_args=f"pretrained={checkpoint}",
                             tasks=[{"task": "fvq20k", "dataset_kwargs": {"root": str(root)}}], batch_size=4,
                             log_samples=True, task_manager=TaskManager("WARNING"), verbosity="WARNING")
    results = output["results"]["fvq20k"]
    errors = {str(path): detail for path, (kind, detail) in listed.values() if kind == "error"}
    assert results["n_failed,none"] == len(errors) and results["n_scored,none"] == len(listed) - len(errors)
    for sample in output["samples"]["fvq20k"]:
        path, answer = sample["doc"]["path"], sample["resps"][0][0]
        if path in errors:
            assert path in answer and errors[path] in answer
        else:
            assert answer.startswith("The video quality is")


def test_bad_input_compare_counts_failures_and_compares_the_rest(dataset, checkpoint, tmp_path, capsys):
    root, cases = dataset
    listed = {name: case for name, case in cases.items() if name not in NOT_IN_LABELS}
    errors = sum(kind == "error" for _, (kind, _) in listed.values())
    assert main(["compare", "--data", str(root), "--metrics", "fvq_rater,piqe", "--frames", "2", "--weights",
                 str(checkpoint), "--out", str(tmp_path / "out"), "--json"]) == 0
    rows = {row["metric"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["fvq_rater"]["failed"] == errors and rows["fvq_rater"]["scored"] == len(listed) - errors
    # PIQE fails on more: a 32-pixel-wide frame has no 16x16 block to score
    assert rows["piqe"]["failed"] >= errors and rows["piqe"]["scored"] + rows["piqe"]["failed"] == len(listed)
