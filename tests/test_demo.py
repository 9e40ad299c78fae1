import json

import pytest
from scipy.stats import spearmanr

from fvq_plugin.demo import format_per_face, per_face


def test_per_face_ranks_each_unseen_face_alone_and_says_how_far_its_scores_sit_from_its_mos(tmp_path):
    videos = {f"a{i}.mp4": ["ann"] for i in range(5)} | {f"b{i}.mp4": ["bob"] for i in range(2)}
    videos |= {"both.mp4": ["ann", "bob"], "scene.mp4": [], "broken.mp4": ["ann"]}
    (tmp_path / "meta.json").write_text(json.dumps({"videos": [{"name": name, "identities": shown}
                                                               for name, shown in videos.items()]}))
    scores, mos = [50.0, 30.0, 60.0, 20.0, 45.0], [52.0, 40.0, 58.0, 10.0, 41.0]
    results = [{"path": f"/set/test/videos/a{i}.mp4", "score": score, "mos": label}
               for i, (score, label) in enumerate(zip(scores, mos))]
    results += [{"path": "/set/test/videos/b0.mp4", "score": 70.0, "mos": 60.0},
                {"path": "/set/test/videos/b1.mp4", "score": 10.0, "mos": 20.0},
                # several faces, no face, not scored: none belongs to one face's figures
                {"path": "/set/test/videos/both.mp4", "score": 99.0, "mos": 1.0},
                {"path": "/set/test/videos/scene.mp4", "score": 1.0, "mos": 99.0},
                {"path": "/set/test/videos/broken.mp4", "error": "cannot decode", "mos": 5.0}]

    faces = per_face(results, tmp_path)

    assert list(faces) == ["ann", "bob"]
    assert faces["ann"]["videos"] == 5
    assert faces["ann"]["srcc"] == pytest.approx(spearmanr(scores, mos).statistic)
    assert faces["ann"]["offset"] == pytest.approx(sum(scores) / 5 - sum(mos) / 5)
    assert faces["bob"]["offset"] == pytest.approx(0.0)
    table = format_per_face(faces)
    assert "ann" in table and f"{faces['ann']['srcc']:.4f}" in table and "+0.80" in table
    # two videos rank nothing: said as n/a, not as a correlation of 1
    assert "bob" in table and "n/a" in table
