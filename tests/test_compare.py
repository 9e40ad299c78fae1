"""`fvq-rater compare`: the same statistics for every metric, agreeing outputs, resumable per metric."""
import contextlib
import csv
import io
import json
import shutil

import pytest

from fvq_plugin.cli import main
from fvq_plugin.compare import PREDICTIONS_DIR, format_table
from fvq_plugin.scoring import Scorer, evaluate

from conftest import small_demo_set

METRICS = "fvq_rater,piqe,niqe,viideo,brisque,topiq_nr"


def compare(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compare", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def frames_128(tmp_path_factory):
    """A demo set whose frames are large enough for NIQE (96 px at least)."""
    return small_demo_set(tmp_path_factory, size=128)


@pytest.fixture(scope="module")
def compared(frames_128, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    code, stdout, stderr = compare("--data", frames_128, "--split", "test", "--metrics", METRICS, "--weights", checkpoint,
                                   "--out", out)
    assert code == 0, stderr[-3000:]
    return out, stdout


def test_table_csv_and_json_agree_and_the_plot_is_written(compared, frames_128, checkpoint):
    out, stdout = compared
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["metric"] for r in rows] == METRICS.split(",")
    with open(out / "compare.csv", newline="") as file:
        table = list(csv.DictReader(file))
    for row, line in zip(rows, table):
        for key, value in row.items():
            assert line[key] == ("" if value is None else str(value)), (row["metric"], key)
    assert format_table(rows) in stdout
    by_name = {r["metric"]: r for r in rows}
    for name in ("fvq_rater", "piqe", "niqe", "viideo"):  # the classic ones from parameters shipped in wheels
        assert by_name[name]["status"] == "ok" and by_name[name]["scored"] == 9 and by_name[name]["failed"] == 0, name
        assert by_name[name]["seconds_per_video"] > 0 and by_name[name]["peak_mb"] > 0
        assert f"{by_name[name]['srcc']:.4f}" in stdout
    for name in ("brisque", "topiq_nr"):  # their parameter files are a download away
        assert by_name[name]["status"] == "unavailable" and f"--metric-weights {name}=PATH" in by_name[name]["reason"]
        assert f"| {name} | unavailable: {by_name[name]['reason']}" in stdout
    assert by_name["piqe"]["lower_better"] and "piqe (lower is better)" in stdout
    # FVQ-Rater's row is the Scorer's evaluation of the same checkpoint.
    report, _ = evaluate(Scorer.from_pretrained(checkpoint), frames_128, "test", progress=False)
    assert by_name["fvq_rater"]["srcc"] == pytest.approx(report["srcc"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_computes_only_a_metric_added_later(compared, frames_128, checkpoint, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compared[0], out)
    before = {p.name: p.read_bytes() for p in (out / PREDICTIONS_DIR).iterdir()}
    code, stdout, stderr = compare("--data", frames_128, "--metrics", f"{METRICS},entropy", "--weights", checkpoint,
                                   "--out", out, "--resume")
    assert code == 0, stderr[-3000:]
    after = {p.name: p.read_bytes() for p in (out / PREDICTIONS_DIR).iterdir()}
    assert {name: after[name] for name in before} == before  # nothing recomputed, nothing appended
    added = [name for name in after if name not in before and name.endswith(".jsonl")]
    assert len(added) == 1 and added[0].startswith("entropy-") and len(after[added[0]].splitlines()) == 9
    rows = {r["metric"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    old = {r["metric"]: r for r in json.loads((compared[0] / "compare.json").read_text())["rows"]}
    assert rows["entropy"]["status"] == "ok" and rows["piqe"] == old["piqe"] and rows["fvq_rater"] == old["fvq_rater"]


def test_an_interrupted_metric_resumes_where_it_stopped(compared, frames_128, checkpoint, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compared[0], out)
    piqe = next((out / PREDICTIONS_DIR).glob("piqe-*.jsonl"))
    lines = piqe.read_text().splitlines()
    piqe.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # killed while writing its fifth line
    code, _, stderr = compare("--data", frames_128, "--metrics", "piqe", "--out", out, "--resume")
    assert code == 0, stderr[-3000:]
    rows = {r["metric"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    old = {r["metric"]: r for r in json.loads((compared[0] / "compare.json").read_text())["rows"]}
    assert rows["piqe"]["srcc"] == old["piqe"]["srcc"] and rows["piqe"]["scored"] == 9


def test_threads_prepare_the_raters_videos_and_change_no_prediction(compared, frames_128, checkpoint, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = compare("--data", frames_128, "--metrics", "fvq_rater", "--weights", checkpoint, "--out", out,
                              "--threads", "2")
    assert code == 0, stderr[-3000:]

    def lines(folder):
        file = next((folder / PREDICTIONS_DIR).glob("fvq_rater-*.jsonl"))
        return [json.loads(line) for line in file.read_text().splitlines()]

    threaded = lines(out)
    assert {line["content"]: line["pred"] for line in threaded} == \
        pytest.approx({line["content"]: line["pred"] for line in lines(compared[0])})
    # Batches of 8 stream out of the scorer: the first one's lines are marked as carrying the loads.
    assert [line["first"] for line in threaded] == [True] * 8 + [False]


def test_another_lmms_eval_model_is_a_column(compared, frames_128, checkpoint, tmp_path):
    """Logged samples as lmms-eval writes them: the task's parsed score per video path (None: failed)."""
    results = Scorer.from_pretrained(checkpoint).score(
        [str(p) for p in sorted((frames_128 / "test" / "videos").iterdir())], progress=False)
    samples = tmp_path / "samples_fvq20k.jsonl"
    with samples.open("w") as file:
        for i, result in enumerate(results):
            answer = result["text"] if i else "[error] could not read the video"
            file.write(json.dumps({"doc_id": i, "filtered_resps": answer,
                                   "srcc": {"path": result["path"], "mos": 0, "pred": result["score"] if i else None}})
                       + "\n")
    code, stdout, stderr = compare("--data", frames_128, "--metrics", "piqe", "--out", tmp_path / "out",
                                   "--lmms-eval-samples", f"other-lmm={samples}")
    assert code == 0, stderr[-3000:]
    row = {r["metric"]: r for r in json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]}["other-lmm"]
    assert row["scored"] == 8 and row["failed"] == 1 and "| other-lmm |" in stdout


def test_usage_mistakes_are_said_before_any_work(compared, frames_128, tmp_path):
    code, _, stderr = compare("--data", frames_128, "--metrics", "piqee", "--out", tmp_path / "o")
    assert code == 2 and "unknown metric 'piqee'; did you mean piqe" in stderr
    code, _, stderr = compare("--data", frames_128, "--metrics", "piqe", "--out", compared[0])
    assert code == 2 and "holds a comparison already: add --resume" in stderr
    code, _, stderr = compare("--data", frames_128, "--metric-weights", "niqe", "--out", tmp_path / "o")
    assert code == 2 and "--metric-weights niqe: expected NAME=PATH" in stderr
    assert not (tmp_path / "o").exists()


def test_without_weights_fvq_rater_and_a_full_reference_metric_are_unavailable_and_the_rest_runs(
        frames_128, tmp_path, monkeypatch):
    monkeypatch.delenv("FVQ_RATER_WEIGHTS", raising=False)
    code, stdout, _ = compare("--data", frames_128, "--metrics", "fvq_rater,piqe,ssim", "--out", tmp_path / "o")
    assert code == 0 and "| fvq_rater | unavailable: no FVQ-Rater weights" in stdout and "| piqe (lower" in stdout
    assert "| ssim | unavailable: a FR metric needs a reference video, and compare has none" in stdout


def test_seconds_per_video_leave_out_each_runs_first_chunk_when_there_are_others(tmp_path):
    from fvq_plugin.compare import read_predictions

    file = tmp_path / "m.jsonl"
    lines = [{"content": "a", "seconds": 5.0, "first": True, "pred": 1.0},  # a run's model loads
             {"content": "b", "seconds": 0.5, "first": False, "pred": 2.0},
             {"content": "c", "seconds": 4.0, "first": True, "error": "bad"},  # a resumed run's loads
             {"content": "d", "seconds": 0.7, "first": False, "pred": 3.0}]
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    predictions, seconds = read_predictions(file)
    assert predictions == {"a": 1.0, "b": 2.0, "d": 3.0} and seconds == [0.5, 0.7]
    file.write_text(json.dumps(lines[0]) + "\n")
    assert read_predictions(file)[1] == [5.0]
