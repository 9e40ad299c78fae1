"""fvq_rater_lite: distillation from the tiny FVQ-Rater, the student as a metric (pyiqa, score, compare), ONNX, bench."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch

import pyiqa
from fvq_plugin.cli import main
from fvq_plugin.data import read_split
from fvq_plugin.demo_data import build_unlabeled_pool
from fvq_plugin.distill import DistillConfig, distill
from fvq_plugin.lite import (LiteConfig, LiteExtractor, LiteScorer, batch_inputs, check_onnx, for_inference, load_student,
                             onnx_session)
from fvq_plugin.scoring import Scorer, read_results

POOL = 12
# 64-px frames and 32-px faces: the demo set's videos are 64 px.
SMALL = DistillConfig(epochs=4, batch_size=16, lite=LiteConfig(frame_size=64, face_size=32))
ASTRONAUT = Path(skimage.__file__).parent / "data" / "astronaut.png"


@pytest.fixture(scope="module")
def pool(demo_set):
    return build_unlabeled_pool(demo_set, POOL, seed=0, frames=12, size=64, progress=False)


@pytest.fixture(scope="module")
def distilled(checkpoint, demo_set, pool, feature_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    return out, distill(checkpoint, demo_set, out, unlabeled=pool, config=SMALL, cache_dir=feature_cache,
                        progress=False, log_line=lambda _: None)


@pytest.fixture(scope="module")
def student(distilled):
    return Path(distilled[1]["student"])


@pytest.fixture(scope="module")
def videos(demo_set):
    return [str(r.path) for r in read_split(demo_set, "test")][:3]


def test_the_pool_shows_training_identities_only_and_withholds_labels(demo_set, pool):
    meta = json.loads((demo_set / "meta.json").read_text())
    pool_meta = json.loads((pool.parent / "meta.json").read_text())
    assert len(list(pool.glob("*.mp4"))) == POOL and not (pool.parent / "labels.txt").exists()
    shown = {name for video in pool_meta["videos"] for name in video["identities"]}
    assert shown and shown <= set(meta["identities"]["train"])
    labelled = {video["name"] for video in meta["videos"]}
    assert not labelled & {video["name"] for video in pool_meta["videos"]}
    before = {p.name: p.stat().st_mtime_ns for p in pool.iterdir()}
    assert build_unlabeled_pool(demo_set, POOL, seed=0, frames=12, size=64, progress=False) == pool
    assert {p.name: p.stat().st_mtime_ns for p in pool.iterdir()} == before  # reused, not rebuilt


def test_teacher_pseudo_labels_the_pool_and_the_student_trains_on_both(distilled, demo_set, checkpoint, pool):
    out, report = distilled
    labels = read_results(out / "pseudo-labels-0.jsonl")
    assert len(labels) == POOL and all(0 <= r["score"] <= 100 for r in labels.values())
    teacher = Scorer.from_pretrained(checkpoint).score(sorted(labels), progress=False)
    assert [r["score"] for r in teacher] == pytest.approx([labels[p]["score"] for p in sorted(labels)], abs=1e-4)
    assert report["labelled"] == len(read_split(demo_set, "train")) and report["pseudo_labelled"] == POOL
    history = report["history"]
    assert len(history) == SMALL.epochs and history[-1]["loss"] < history[0]["loss"]
    saved = json.loads((out / "student" / "fvq_rater_lite.json").read_text())
    assert saved["trained"]["pseudo_labelled"] == POOL and saved["config"]["frame_size"] == 64


def test_a_rerun_reuses_pseudo_labels_and_cached_inputs(distilled, checkpoint, demo_set, pool, feature_cache,
                                                        monkeypatch, capsys):
    out, _ = distilled

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(Scorer, "score_features", must_not_run)  # the teacher
    monkeypatch.setattr("fvq_plugin.lite.LitePreparer.__call__", must_not_run)  # decoding for the student
    # Through the command line, continuing the first student (whose input settings then apply).
    assert main(["distill", "--teacher", str(checkpoint), "--data", str(demo_set), "--unlabeled", str(pool),
                 "--out", str(out), "--cache", str(feature_cache), "--epochs", "2", "--batch-size", "16",
                 "--student-init", str(out / "student")]) == 0
    assert f"+ {POOL} pseudo-labelled videos" in capsys.readouterr().out
    assert json.loads((out / "student" / "fvq_rater_lite.json").read_text())["trained"]["init"] == str(out / "student")


def test_the_student_can_read_frames_spread_over_the_clip(distilled, checkpoint, demo_set, pool, feature_cache, videos,
                                                          tmp_path):
    out = tmp_path / "spread"
    out.mkdir()
    shutil.copy(distilled[0] / "pseudo-labels-0.jsonl", out)  # the teacher's labels, not computed again
    assert main(["distill", "--teacher", str(checkpoint), "--data", str(demo_set), "--unlabeled", str(pool),
                 "--out", str(out), "--cache", str(feature_cache), "--epochs", "1", "--batch-size", "16",
                 "--student-sampling", "centres"]) == 0
    saved = json.loads((out / "student" / "fvq_rater_lite.json").read_text())
    assert (saved["config"]["frame_sampling"], saved["config"]["num_frames"]) == ("centres", 4)
    (result,) = LiteScorer.from_pretrained(out / "student").score(videos[:1], progress=False)
    assert 0 <= result["score"] <= 100


def test_self_training_round_fine_tunes_the_teacher_and_labels_again(checkpoint, demo_set, pool, distilled,
                                                                     feature_cache, tmp_path):
    out = tmp_path / "rounds"
    config = DistillConfig(rounds=1, teacher_epochs=1, epochs=1, batch_size=16, lite=SMALL.lite)
    report = distill(checkpoint, demo_set, out, unlabeled=pool, config=config, cache_dir=feature_cache, progress=False,
                     log_line=lambda _: None)
    assert [r["pseudo_labelled"] for r in report["rounds"]] == [POOL, POOL]
    assert report["final_teacher"] == str(out / "teacher-round1" / "best")
    first, second = (read_results(out / f"pseudo-labels-{k}.jsonl") for k in (0, 1))
    assert [first[p]["score"] for p in first] != [second[p]["score"] for p in first]


@pytest.mark.parametrize("sampling, searches, searches_without_face", [("leading", 3, 2), ("centres", 4, 4)])
def test_the_face_found_first_crops_the_later_leading_frames_spread_frames_are_each_searched(
        sampling, searches, searches_without_face):
    from fvq_plugin.lite import LitePreparer

    preparer = LitePreparer(LiteConfig(num_frames=4, frame_sampling=sampling))
    searched = []
    detect = preparer.detector.detect
    preparer.detector.detect = lambda frame: searched.append(frame) or detect(frame)
    astronaut = skimage.data.astronaut()
    # leading: the first frame, the last (a face: look in between), the second (the face's first frame)
    inputs = preparer.from_frames(np.stack([np.zeros_like(astronaut)] + [astronaut] * 3))
    assert inputs["face_mask"].tolist() == [False, True, True, True]
    assert len(searched) == searches
    assert torch.equal(inputs["faces"][1], inputs["faces"][3]) and inputs["faces"][0].sum() == 0
    searched.clear()
    inputs = preparer.from_frames(np.zeros((4, 64, 64, 3), np.uint8))  # no face: leading looks at first and last
    assert not inputs["face_mask"].any() and len(searched) == searches_without_face
    assert inputs["info"]["face_frames"] == 0 and inputs["info"]["most_faces"] == 0


def test_onnx_export_scores_as_torch_does(student, videos, tmp_path):
    assert main(["export-onnx", str(student), "--out", str(tmp_path / "lite.onnx")]) == 0
    model = load_student(student)
    prepared = [LiteExtractor(model.config).preparer(path) for path in videos]
    inputs = batch_inputs(prepared)
    with torch.no_grad():
        expected = model(**inputs).numpy()
    (scores,) = onnx_session(tmp_path / "lite.onnx").run(["score"], {k: v.numpy() for k, v in inputs.items()})
    assert np.abs(scores - expected).max() <= 1e-4
    assert check_onnx(model, tmp_path / "lite.onnx") <= 1e-4


def test_the_scoring_copy_with_batch_norms_folded_scores_as_the_trained_network(student, videos):
    model = load_student(student)
    inputs = batch_inputs([LiteExtractor(model.config).preparer(path) for path in videos])
    scoring = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in scoring.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy: the trained one is kept
    with torch.no_grad():
        assert torch.allclose(scoring(**inputs), model(**inputs), atol=1e-4)


def test_scoring_with_preparing_threads_gives_the_same_scores_and_leaves_torch_threads_as_they_were(student, videos):
    inline = LiteScorer.from_pretrained(student).score(videos, progress=False)
    before = torch.get_num_threads()
    threaded = LiteScorer.from_pretrained(student, threads=2, batch_size=2).score(videos, progress=False)
    assert torch.get_num_threads() == before
    assert [r["score"] for r in threaded] == pytest.approx([r["score"] for r in inline], abs=1e-4)


def test_pyiqa_fvq_rater_lite_scores_a_video_a_frame_tensor_and_an_image(student, videos):
    metric = pyiqa.create_metric("fvq_rater_lite", device="cpu", pretrained_model_path=str(student))
    assert "fvq_rater_lite" in pyiqa.list_models(metric_mode="NR") and metric.lower_better is False
    batch = metric(videos)
    expected = [r["score"] for r in LiteScorer.from_pretrained(student).score(videos, progress=False)]
    assert batch.tolist() == pytest.approx(expected, abs=1e-4)
    assert metric(videos[0]).item() == pytest.approx(expected[0], abs=1e-4)
    frames = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    assert metric(frames.repeat(6, 1, 1, 1)).shape == (1,)
    assert 0 <= metric(str(ASTRONAUT)).item() <= 100


def test_score_eval_and_compare_take_the_student(student, videos, demo_set, tmp_path, capsys):
    assert main(["score", *videos, "--weights", str(student), "--output", str(tmp_path / "r.jsonl")]) == 0
    assert len(read_results(tmp_path / "r.jsonl")) == 3
    assert main(["score", videos[0], "--weights", str(student), "--temporal-random"]) == 2
    assert "fvq_rater_lite student" in capsys.readouterr().err
    assert main(["compare", "--data", str(demo_set), "--metrics", "fvq_rater_lite", "--metric-weights",
                 f"fvq_rater_lite={student}", "--out", str(tmp_path / "cmp"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["metric"] == "fvq_rater_lite" and row["status"] == "ok" and row["scored"] == len(read_split(demo_set, "test"))


def test_bench_lite_times_teacher_and_student_in_one_run(student, checkpoint, tmp_path):
    from fvq_plugin.bench import bench_lite, format_lite

    result = bench_lite(str(checkpoint), str(student), videos=2, threads=2)
    for side in ("teacher", "student"):
        assert set(result[side]["seconds_per_video"]) == {"0", "2"}
        assert min(result[side]["seconds_per_video"].values()) > 0 and result[side]["peak_memory_mb"] > 0
    assert set(result["student_speedup"]) == {"0", "2"} and min(result["student_speedup"].values()) > 0
    assert result["student_import_and_first_score_s"] > 0
    table = format_lite(result)
    assert "both preparing videos inline" in table and "both preparing videos in 2 threads" in table


def test_a_wrong_student_folder_is_named(checkpoint, tmp_path, capsys):
    assert main(["score", "x.mp4", "--weights", str(tmp_path)]) == 2
    with pytest.raises(Exception, match="not an fvq_rater_lite checkpoint"):
        pyiqa.create_metric("fvq_rater_lite", pretrained_model_path=str(checkpoint))
    assert main(["export-onnx", str(tmp_path)]) == 2
    assert "fvq_rater_lite.json not found" in capsys.readouterr().err


def test_unlabeled_videos_come_from_a_folder_or_a_list_file(pool, tmp_path):
    from fvq_plugin.distill import unlabeled_videos
    from fvq_plugin.errors import InputError

    found = unlabeled_videos(pool)
    assert len(found) == POOL and found == sorted(found)
    listing = tmp_path / "pool.txt"
    listing.write_text("# two of them\n" + "\n".join(os.path.relpath(p, tmp_path) for p in found[:2]) + "\n\n")
    assert [Path(p).resolve() for p in unlabeled_videos(listing)] == [Path(p).resolve() for p in found[:2]]
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(InputError, match="--unlabeled"):
            unlabeled_videos(bad)
