"""Scoring on Ray (issue 15): a local 2-CPU Ray instance gives the local Scorer's results, survives killed
workers, turns bad videos into rows and resumes."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet
import pytest

from fvq_plugin.cli import main
from fvq_plugin.data import read_split
from fvq_plugin.errors import InputError
from fvq_plugin.ray_scoring import RESULTS_JSONL, _reusable_content, read_manifest, read_output, score_on_ray
from fvq_plugin.scoring import ResultsFileError, Scorer, checkpoint_extractor, read_results

ray = pytest.importorskip("ray", reason="the [ray] extra")  # part of the test extra: CI runs these


@pytest.fixture(scope="module")
def ray_cluster():
    # Ray's workers cannot import this test module: its fault-injecting factories travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def test_videos(demo_set, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken") / "not_a_video.mp4"
    broken.write_bytes(b"this is not an mp4 file")
    return [str(r.path) for r in read_split(demo_set, "test")] + [str(broken)]


@pytest.fixture(scope="module")
def local_results(checkpoint, test_videos):
    return {r["path"]: r for r in Scorer.from_pretrained(checkpoint).score(test_videos, progress=False)}


def run(checkpoint, paths, out, make_extractor=None, make_scorer=None, **options):
    return score_on_ray(paths, out, make_extractor or functools.partial(checkpoint_extractor, checkpoint),
                        make_scorer or functools.partial(Scorer.from_pretrained, checkpoint, batch_size=4),
                        progress=False, **options)


def assert_same_results(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for path, result in expected.items():
        if "error" in result:
            assert got[path]["error"] == result["error"]
            continue
        assert got[path]["score"] == pytest.approx(result["score"], abs=1e-5)
        assert (got[path]["level"], got[path]["flags"], got[path]["content"], got[path]["scorer"]) == \
               (result["level"], result["flags"], result["content"], result["scorer"])
        assert got[path]["level_probs"] == pytest.approx(result["level_probs"], abs=1e-6)


@pytest.mark.reliability
def test_an_interrupted_run_resumes_to_the_local_scorers_results(ray_cluster, checkpoint, test_videos,
                                                                 local_results, tmp_path, capsys):
    out = tmp_path / "out"
    # Another driver on the same cluster, its videos slowed to 0.5 s each, killed once it has written a part
    # of 2 results.
    code = (f"import functools, sys, ray\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"import test_ray\n"
            f"from fvq_plugin.ray_scoring import score_on_ray\n"
            f"from fvq_plugin.scoring import Scorer\n"
            f"ray.init(address='auto', logging_level='WARNING', log_to_driver=False)\n"
            f"ray.cloudpickle.register_pickle_by_value(test_ray)\n"
            f"score_on_ray({test_videos!r}, {str(out)!r}, functools.partial(test_ray.slow_extractor, {str(checkpoint)!r}),\n"
            f"             functools.partial(Scorer.from_pretrained, {str(checkpoint)!r}), batch_size=2, part_rows=2,\n"
            f"             prepare_batch_size=1, progress=False)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None and not list(out.glob("part-*.parquet")):
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = read_output(out)
    assert 2 <= len(done) < len(test_videos), "the driver was not killed mid-way"
    # The command line resumes it on this cluster (a running Ray session is used as it is).
    assert main(["score", "--engine", "ray", *test_videos, "--weights", str(checkpoint), "--output", str(out),
                 "--resume", "--batch-size", "4", "--json"]) == 1  # 1: the file that is not a video failed
    summary = json.loads(capsys.readouterr().out)
    assert (summary["resumed"], summary["scored"] + summary["failed"]) == (len(done), len(test_videos) - len(done))
    assert summary["lost"] == 0
    assert_same_results(read_output(out), local_results)  # the file that is not a video too: a row with its error
    # results.jsonl: one line per video in input order, readable as the local engine's --output file
    lines = (out / RESULTS_JSONL).read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == test_videos
    assert_same_results(read_results(out / RESULTS_JSONL), local_results)


class KillingPreparer:
    """A preparer whose worker process is SIGKILLed on given videos: once each (a marker file remembers it),
    or every time for `always`."""

    def __init__(self, preparer, once: list[str], always: list[str], markers: Path):
        self.preparer, self.once, self.always, self.markers = preparer, once, always, markers

    def __call__(self, path):
        name = Path(path).name
        marker = self.markers / f"{name}.killed"
        if name in self.always or (name in self.once and not marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.preparer(path)


class SlowPreparer:
    def __init__(self, preparer, seconds: float):
        self.preparer, self.seconds = preparer, seconds

    def __call__(self, path):
        time.sleep(self.seconds)
        return self.preparer(path)


def slow_extractor(checkpoint, seconds: float = 0.5):
    extractor = checkpoint_extractor(checkpoint)
    extractor.preparer = SlowPreparer(extractor.preparer, seconds)
    return extractor


def killing_extractor(checkpoint, once, always, markers):
    extractor = checkpoint_extractor(checkpoint)
    extractor.preparer = KillingPreparer(extractor.preparer, once, always, markers)
    return extractor


@pytest.mark.reliability
def test_killed_workers_are_retried_and_a_video_that_always_kills_its_worker_is_a_row(
        ray_cluster, checkpoint, test_videos, local_results, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    names = [Path(p).name for p in test_videos]
    make_extractor = functools.partial(killing_extractor, checkpoint, once=[names[1]], always=[names[5]], markers=markers)
    out = tmp_path / "out"
    summary = run(checkpoint, test_videos, out, make_extractor, prepare_batch_size=1, task_retries=1)
    assert {p.name for p in markers.iterdir()} == {f"{names[1]}.killed", f"{names[5]}.killed"}
    assert summary["lost"] == 1
    got = read_output(out)
    lost = got.pop(test_videos[5])
    assert lost["retry"] and lost["error"].startswith("lost: the Ray task that held this video failed 2 times")
    assert_same_results(got, {p: r for p, r in local_results.items() if p != test_videos[5]})
    rows = [row["path"] for part in out.glob("part-*.parquet") for row in pyarrow.parquet.read_table(part).to_pylist()]
    assert sorted(rows) == sorted(test_videos)  # no duplicate, no missing row
    # --resume would score the lost video again, and no other
    assert _reusable_content(lost) == "" and all(_reusable_content(r) == r["content"] for r in got.values())

    # The folder is continued only on purpose, and never with another scorer (here: LoRA kept apart),
    # even when no video is left to score.
    with pytest.raises(InputError, match="--resume"):
        run(checkpoint, test_videos, out)
    another = functools.partial(Scorer.from_pretrained, checkpoint, merge_lora=False)
    with pytest.raises(ResultsFileError, match="another checkpoint, other settings"):
        run(checkpoint, test_videos, out, make_scorer=another, resume=True)


def test_manifests(tmp_path):
    import pyarrow as pa

    paths = ["/data/a.mp4", "s3://bucket/b.mp4"]
    (tmp_path / "list.txt").write_text("# uploads\n/data/a.mp4\n\ns3://bucket/b.mp4\n")
    (tmp_path / "list.csv").write_text("mos,path\n1,/data/a.mp4\n2,s3://bucket/b.mp4\n")
    pyarrow.parquet.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        assert read_manifest(tmp_path / name) == paths
    assert read_manifest(f"file://{tmp_path / 'list.txt'}") == paths


def test_a_remote_video_is_decoded_from_a_temporary_copy(tmp_path):
    import fsspec

    from fvq_plugin.ray_scoring import local_copy

    with fsspec.open("memory://uploads/clip.mp4", "wb") as handle:  # any fsspec filesystem, e.g. s3://
        handle.write(b"video bytes")
    with local_copy("memory://uploads/clip.mp4") as local:
        assert Path(local).name == "clip.mp4" and Path(local).read_bytes() == b"video bytes"
    assert not Path(local).exists()
    with local_copy(f"file://{tmp_path}/a.mp4") as local, local_copy("plain/path.mp4") as plain:
        assert (local, plain) == (f"{tmp_path}/a.mp4", "plain/path.mp4")


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, capsys, checkpoint, demo_set, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["score", "--engine", "ray", "--data", str(demo_set), "--weights", str(checkpoint),
                 "--output", str(tmp_path / "out")]) == 2
    assert 'pip install "fvq-plugin[ray]"' in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--engine", "ray"], "give --output DIR"),
    (["--engine", "ray", "--output", "OUT", "--workers", "2"], "--workers: options of the local engine"),
    (["--engine", "ray", "--output", "OUT", "--manifest", "list.txt"], "name the videos one way"),
    (["--manifest", "list.txt"], "--manifest: options of --engine ray"),
    (["--engine", "ray", "--output", "OUT", "--rate-actors", "0"], "--rate-actors 0: give a positive number"),
])
def test_score_engine_usage_errors(arguments, message, capsys, checkpoint, demo_set, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--data", str(demo_set), "--weights", str(checkpoint), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_manifest_is_named_before_ray_starts(capsys, checkpoint, tmp_path):
    assert main(["score", "--engine", "ray", "--manifest", str(tmp_path / "missing.csv"), "--weights", str(checkpoint),
                 "--output", str(tmp_path / "out")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
