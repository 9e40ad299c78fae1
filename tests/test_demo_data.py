import dataclasses
import hashlib
import itertools
import json
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.stats import spearmanr

from fvq_plugin import demo_data
from fvq_plugin.demo_data import (CORNER_CASES, MOS_FORMULA, SPLITS, Source, build_demo_set, format_summary, load_summary,
                                  mos_from_severity, plan_videos, source_path, split_sizes)
from fvq_plugin.video import write_video

# Small enough to build in seconds, big enough for a test split of 9: 8 corner cases and a normal video.
SMALL = dict(n_videos=60, frames=10, size=64, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    summary = build_demo_set(out_dir, seed=3, **SMALL)
    return out_dir, summary, json.loads((out_dir / "meta.json").read_text())


def read_labels(out_dir: Path) -> dict[str, list[str]]:
    return {split: (out_dir / split / "labels.txt").read_text().splitlines() for split in SPLITS}


def video_bytes(out_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in sorted(out_dir.rglob("*.mp4"))}


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_layout_and_labels(built):
    out_dir, summary, meta = built
    labels = read_labels(out_dir)
    mos_by_name = {video["name"]: video["mos"] for video in meta["videos"]}
    for split, lines in labels.items():
        assert lines and all(re.fullmatch(r"demo_\d{5}\.mp4,\d{1,3}\.\d{2}", line) for line in lines)
        names = [line.split(",")[0] for line in lines]
        assert sorted(names) == sorted(path.name for path in (out_dir / split / "videos").iterdir())
        assert all(float(line.split(",")[1]) == mos_by_name[name] for line, name in zip(lines, names))
        assert summary["splits"][split]["count"] == len(lines)
    assert sum(len(lines) for lines in labels.values()) == len(meta["videos"]) == SMALL["n_videos"]
    assert meta["seed"] == 3 and meta["mos_formula"] == MOS_FORMULA and "builder_version" in meta
    assert all(video["split"] in SPLITS for video in meta["videos"])


def test_split_sizes():
    assert split_sizes(200) == {"train": 160, "val": 10, "test": 30}
    for n_videos in range(3, 400):
        sizes = split_sizes(n_videos)
        assert sum(sizes.values()) == n_videos and min(sizes.values()) >= 1
        assert abs(sizes["test"] - 0.15 * n_videos) <= 1 and abs(sizes["val"] - 0.05 * n_videos) <= 1
    with pytest.raises(ValueError):
        split_sizes(2)


def test_default_plan_covers_mos_range_with_corner_cases_in_test():
    plans = plan_videos(200, seed=0)
    mos = [plan.mos for plan in plans]
    assert min(mos) < 20 and max(mos) > 85
    assert sum(plan.split == "test" for plan in plans) >= 30
    corner = [plan for plan in plans if plan.corner_case]
    assert all(plan.split == "test" for plan in corner)
    assert sorted(plan.corner_case for plan in corner) == sorted(CORNER_CASES * 2)


def test_corner_cases_flagged_in_test_split(built):
    out_dir, summary, meta = built
    corner = [video for video in meta["videos"] if video["corner_case"]]
    assert all(video["split"] == "test" for video in corner)
    assert {kind: sum(v["corner_case"] == kind for v in corner) for kind in CORNER_CASES} == dict.fromkeys(
        CORNER_CASES, 2) == summary["splits"]["test"]["corner_cases"]
    assert any(video["split"] == "test" and not video["corner_case"] for video in meta["videos"])
    for video in corner:
        width, height = video["size"]
        kind = video["corner_case"]
        assert (kind == "portrait") == (height > width)
        assert (kind == "short") == (video["frames"] < 8)
        assert (kind == "multi_face") == (len(video["identities"]) > 1)
        if kind == "multi_face":
            assert video["identities"] == meta["identities"]["test"] and video["source"].startswith("composite:")
        assert (kind == "no_face") == (video["identities"] == [])
        if kind == "no_face":
            assert video["source"].split("/")[-1] in {"coffee.png", "chelsea.png", "rocket.jpg"}


def assert_content_disjoint(meta: dict) -> None:
    """No identity is in two splits, and every video shows only identities of its own split."""
    assigned = meta["identities"]
    assert sorted(name for split in SPLITS for name in assigned[split]) == sorted(demo_data.IDENTITIES)
    assert {split: len(assigned[split]) for split in ("val", "test")} == demo_data.HELD_OUT_IDENTITIES
    for video in meta["videos"]:
        assert set(video["identities"]) <= set(assigned[video["split"]]), video["name"]
    for split in SPLITS:  # every identity of a split is shown in it
        shown = {name for video in meta["videos"] if video["split"] == split for name in video["identities"]}
        assert shown == set(assigned[split])


def test_splits_are_content_disjoint_and_seeds_assign_identities_differently(built, tmp_path):
    from fvq_plugin.cli import main

    meta = built[2]
    assert_content_disjoint(meta)
    assert main(["make-demo-data", str(tmp_path / "other"), "--videos", "60", "--seed", "4"]) == 0
    other = json.loads((tmp_path / "other" / "meta.json").read_text())
    assert_content_disjoint(other)
    assert other["identities"]["test"] != meta["identities"]["test"]
    for seed in range(20):  # every seed's test split fits its portrait corner case
        assert any(demo_data.IDENTITIES[name].fits_portrait for name in demo_data.assign_identities(seed)["test"])


def assert_one_face_inside_focus(detector, name: str, image: np.ndarray) -> None:
    x0, y0, x1, y1 = demo_data.IDENTITIES[name].bounds_box(image.shape)
    boxes = detector.detect(image[y0:y1, x0:x1])[0] + [x0, y0, x0, y0]
    assert len(boxes) == 1, (name, boxes)
    centre_x, centre_y = (boxes[0, :2] + boxes[0, 2:]) / 2 / image.shape[1::-1]
    fx0, fy0, fx1, fy1 = demo_data.IDENTITIES[name].focus
    assert fx0 < centre_x < fx1 and fy0 < centre_y < fy1, name


def test_every_identity_is_one_face_inside_its_focus_and_bounds():
    """The focus box holds the identity's face, and its bounds (the crop limits) show no other face."""
    from fvq_plugin.features.face import FaceFeatures

    detector = FaceFeatures("yunet-sface")
    for name in demo_data.IDENTITIES:
        assert_one_face_inside_focus(detector, name, demo_data.load_source_image(name))


def test_another_background_keeps_every_identity_one_face_inside_its_focus():
    """The person stays whole in front of another background: the face is still the only one, where it was."""
    from fvq_plugin.features.face import FaceFeatures

    detector, backdrops = FaceFeatures("yunet-sface"), demo_data.Backdrops()
    plain = plan_videos(60, seed=0, frames=10, size=64)[0]
    for name, background in zip(demo_data.IDENTITIES, itertools.cycle(demo_data.BACKGROUNDS)):
        plan = dataclasses.replace(plain, source=name, look=dataclasses.replace(plain.look, background=background))
        photo = demo_data.load_source_image(name)
        image = backdrops.apply(plan, photo)
        x0, y0, x1, y1 = demo_data.IDENTITIES[name].bounds_box(image.shape)
        changed = np.abs(image.astype(int) - photo).max(axis=2) > 8
        # Some background went, the person stayed (group_5's strip is mostly table and people: 6% changes).
        assert 0.05 < changed[y0:y1, x0:x1].mean() < 0.8, (name, background)
        assert not changed[:, :x0].any() and not changed[:, x1:].any()  # nothing outside the crops' bounds
        assert_one_face_inside_focus(detector, name, image)


def test_half_the_identity_videos_get_another_background_and_no_other_video_does():
    plans = plan_videos(400, seed=0)
    identity_plans = [plan for plan in plans if plan.source in demo_data.IDENTITIES]
    assert 0.4 < np.mean([plan.look.background is not None for plan in identity_plans]) < 0.6
    assert {plan.look.background for plan in identity_plans} == {None, *demo_data.BACKGROUNDS}
    assert all(plan.look.background is None for plan in plans if plan.source not in demo_data.IDENTITIES)


def test_a_plain_look_leaves_frames_alone_and_looks_vary():
    frame = demo_data.load_source_image("astronaut")[:96, :128]
    plain = demo_data.Look(flip=False, hue_degrees=0.0, saturation=1.0, white_balance=(1.0, 1.0, 1.0),
                           light_angle=0.0, light_ramp=0.0)
    assert np.abs(plain.apply([frame])[0].astype(int) - frame).max() <= 1
    assert np.array_equal(dataclasses.replace(plain, flip=True).apply([frame])[0], frame[:, ::-1])
    plans = plan_videos(60, seed=0, frames=10, size=64)
    assert 0.2 < np.mean([plan.look.flip for plan in plans]) < 0.8
    assert len({plan.look.hue_degrees for plan in plans}) == len(plans)


def record_encoder_inputs(monkeypatch) -> dict[str, str]:
    """Digest of the frames and settings build_demo_set hands write_video, per video file name."""
    inputs = {}

    def recording_write_video(path, frames, **settings):
        frames = list(frames)
        digest = hashlib.sha256(np.stack(frames).tobytes() + repr(sorted(settings.items())).encode())
        inputs[Path(path).name] = digest.hexdigest()
        write_video(path, frames, **settings)

    monkeypatch.setattr(demo_data, "write_video", recording_write_video)
    return inputs


def test_same_seed_same_labels_meta_and_encoder_inputs(tmp_path, monkeypatch):
    inputs = record_encoder_inputs(monkeypatch)
    build_demo_set(tmp_path / "a", seed=5, **SMALL)
    first_inputs = dict(inputs)
    build_demo_set(tmp_path / "b", seed=5, **SMALL)
    assert inputs == first_inputs and len(inputs) == SMALL["n_videos"]
    assert read_labels(tmp_path / "a") == read_labels(tmp_path / "b")
    assert (tmp_path / "a" / "meta.json").read_bytes() == (tmp_path / "b" / "meta.json").read_bytes()
    build_demo_set(tmp_path / "c", seed=6, **SMALL)
    assert read_labels(tmp_path / "c") != read_labels(tmp_path / "a")
    assert inputs != first_inputs


def test_same_seed_same_video_bytes(built, tmp_path):
    out_dir, _, _ = built
    build_demo_set(tmp_path, seed=3, **SMALL)
    assert video_bytes(tmp_path) == video_bytes(out_dir)


def test_mos_decreases_with_total_severity(built):
    _, _, meta = built
    severity = [video["total_severity"] for video in meta["videos"]]
    mos = [video["mos"] for video in meta["videos"]]
    assert spearmanr(severity, mos).statistic < -0.9
    assert mos_from_severity(0.0) > mos_from_severity(1.0) > mos_from_severity(2.0) > mos_from_severity(3.0)
    for video in meta["videos"]:
        inputs = video["mos_inputs"]
        assert video["mos"] == mos_from_severity(inputs["S"], inputs["noise"])


def test_videos_decode_with_expected_frames_and_size(built):
    out_dir, _, meta = built
    for video in meta["videos"]:
        frames = decode(out_dir / video["split"] / "videos" / video["name"])
        width, height = video["size"]
        assert len(frames) == video["frames"]
        assert all(frame.shape == (height, width, 3) for frame in frames)
        if video["severities"]["stutter"] == 0 and video["severities"]["compression"] < 0.5:
            # The camera moves, so without frame drops no two consecutive frames are alike (an encoder starved of
            # bits may repeat a frame that barely moved, which is what low-bitrate video looks like).
            assert all(np.any(a != b) for a, b in zip(frames, frames[1:]))


def test_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    tiny = dict(n_videos=3, frames=6, size=32, corner_cases_per_kind=0, progress=False)
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        build_demo_set(tmp_path, **tiny)
    with pytest.raises(FileExistsError, match="not a demo set written by fvq-rater"):
        build_demo_set(tmp_path, overwrite=True, **tiny)  # not our folder: never emptied
    built = tmp_path / "built"
    build_demo_set(built, **tiny)
    (built / "keep.txt").write_text("x")
    summary = build_demo_set(built, overwrite=True, seed=1, **tiny)  # our own folder may be replaced
    assert (built / "keep.txt").exists() and summary["n_videos"] == 3
    assert "train" in format_summary(summary)


@pytest.mark.reliability
def test_the_demo_never_deletes_a_real_dataset_in_its_workdir(demo_set, tmp_path, capsys):
    from fvq_plugin.cli import main

    real = tmp_path / "work" / "data"
    shutil.copytree(demo_set, real)
    (real / ".fvq-demo-set").unlink()  # a user's own FVQ-20K copy carries no demo marker
    (real / "meta.json").unlink()
    before = sorted(p.relative_to(real) for p in real.rglob("*"))
    assert main(["demo", "--workdir", str(tmp_path / "work"), "--videos", "60"]) == 2
    assert "refusing to replace them" in capsys.readouterr().err
    assert sorted(p.relative_to(real) for p in real.rglob("*")) == before


def test_missing_source_is_named():
    with pytest.raises(FileNotFoundError, match="skimage:data/no_such_face.png"):
        source_path(Source("skimage", "data/no_such_face.png", (0.0, 0.0, 1.0, 1.0)))


def test_every_source_is_found():
    assert all(source_path(source).is_file() for source in (*demo_data.SOURCES.values(), *demo_data.BACKGROUNDS.values()))


def test_load_summary_recognises_a_finished_build(built):
    out_dir, summary = built[0], built[1]
    loaded = load_summary(out_dir, n_videos=summary["n_videos"], seed=summary["seed"])
    assert loaded["splits"] == summary["splits"]
    assert load_summary(out_dir, n_videos=summary["n_videos"], seed=summary["seed"] + 1) is None
    assert load_summary(out_dir / "nowhere", n_videos=summary["n_videos"], seed=summary["seed"]) is None


def test_cli_builds_a_set_that_validates_cleanly(tmp_path, capsys):
    from fvq_plugin.cli import main

    out_dir = tmp_path / "demo"
    assert main(["make-demo-data", str(out_dir), "--videos", "60", "--seed", "1"]) == 0
    assert "60 videos (seed 1)" in capsys.readouterr().out
    assert main(["validate", str(out_dir), "--deep"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    assert main(["make-demo-data", str(out_dir), "--videos", "60"]) == 2  # refuses a non-empty folder
    assert f"{out_dir} is not empty" in capsys.readouterr().err


def test_cli_default_size_is_the_builder_default():
    from fvq_plugin import cli

    assert cli.DEFAULT_VIDEOS == demo_data.DEFAULT_VIDEOS
    assert split_sizes(demo_data.DEFAULT_VIDEOS)["test"] >= 30
