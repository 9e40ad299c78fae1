"""Issue 12 items 2 and 8: the suite notices a rater that stops learning; decoding memory is bounded
whatever the video's length; a video that hangs is timed out and the batch goes on."""
import copy
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fvq_plugin.cli import main
from fvq_plugin.data import read_split
from fvq_plugin.metrics import srcc
from fvq_plugin.scoring import Scorer

from bad_inputs import HangOn, encode

pytestmark = pytest.mark.reliability

# SRCC on identities the tiny rater never saw, trained as below (from the demo's pretrained vision tower),
# measured on demo seeds 0-4 (the suite uses 0): 0.59, 0.55, 0.62, 0.54, 0.56 with the tower pretrained on 160-px
# crops; with today's, pretrained on 128-px crops, and the demo's lower bit rates, seed 0 gives 0.61 (seeds 1-4 not
# measured again); with a random tower it was 0.67, 0.30, 0.51, 0.43, 0.43. By chance (48 videos) SRCC exceeds
# 0.40 with probability 0.003; a rater whose output is constant has no SRCC at all (NaN), and an untrained one
# outputs a constant.
LEARNED_SRCC = 0.40


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    return train_on_some_identities(tmp_path_factory.mktemp("learning"), seed=0)


def train_on_some_identities(folder, seed: int):
    """A tiny rater trained (stage I 1 epoch, stage II 12) on the train split of a 240-video demo set, its
    extractor, and the 48 videos of the set's val and test splits: three identities the rater never saw."""
    from fvq_plugin.demo import DEMO_FEATURES, DEMO_RECIPE
    from fvq_plugin.demo_data import build_demo_set
    from fvq_plugin.features import FeatureConfig, FeatureExtractor
    from fvq_plugin.scoring import split_features
    from fvq_plugin.tiny import tiny_rater
    from fvq_plugin.tower_pretraining import TOWER_FILE
    from fvq_plugin.train import TrainConfig, train

    data = folder / "data"
    build_demo_set(data, n_videos=240, seed=seed, frames=8, size=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SlowFast: said loudly, tested elsewhere
        extractor = FeatureExtractor(FeatureConfig(num_frames=4, image_size=64, temporal_random=True,
                                                   temporal_preprocess="kinetics", temporal_size=32, temporal_frames=8,
                                                   face_embedding=DEMO_FEATURES.face_embedding))
    train_set = split_features(data, "train", extractor, folder / "cache", progress=False)[:2]
    model = tiny_rater(extractor, seed=0, recipe=DEMO_RECIPE, vision_tower=TOWER_FILE)
    for stage, epochs in ((1, 1), (2, 12)):
        train(model, extractor.preparer.spatial, train_set, None, TrainConfig(stage=stage, epochs=epochs, lr=1e-3),
              folder / f"stage{stage}", progress=False)
    held = [record for split in ("val", "test") for record in read_split(data, split)]
    return model, extractor, held


def held_out_srcc(model, extractor, held) -> float:
    results = Scorer(model, extractor).score([r.path for r in held], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant rater's SRCC is undefined, and says so
        return srcc([r["score"] for r in results], [r.mos for r in held])


def test_reliability_the_tiny_rater_learns_to_rank_held_out_videos(learning):
    assert held_out_srcc(*learning) > LEARNED_SRCC


def test_reliability_a_rater_with_a_constant_output_fails_the_learning_check(learning):
    model, extractor, held = learning
    constant = copy.deepcopy(model)
    with torch.no_grad():
        constant.score_head.output.weight.zero_()
        constant.score_head.output.bias.fill_(0.5)
    assert not held_out_srcc(constant, extractor, held) > LEARNED_SRCC


# Decoding keeps only what it returns, whatever the video's length: peak memory stays under
# MEMORY_FACTOR x the bytes of the frames it keeps (full-size sampled frames, or every frame resized
# for FineVQ's motion input) + DECODER_MB for the decoder's own buffers. Before this bound was set,
# lists joined by np.stack and fancy-indexed copies held frames twice: 490 MB where 300 MB do now.
MEMORY_FACTOR, DECODER_MB = 1.25, 64
MEMORY_PROBE = """
import json, resource, sys
from fvq_plugin import video
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
video.sample_frames(sys.argv[1], 2)  # codecs and libraries loaded: the baseline
base = peak_mb()
call = {"sample": lambda p: video.sample_frames(p, 8).frames,
        "sample+dense": lambda p: video.sample_and_dense(p, 8, 32, 224)[0].frames,
        "all at 448": lambda p: video.all_frames(p, size=448).frames}[sys.argv[3]]
call(sys.argv[2])
print(json.dumps(peak_mb() - base))
"""


@pytest.fixture(scope="module")
def long_1080p(tmp_path_factory):
    """240 frames of 1920x1080 (8 s at 30 fps), moving noise blocks; and a 3-frame baseline video."""
    folder = tmp_path_factory.mktemp("long")
    base = np.random.default_rng(0).integers(0, 255, (135, 240, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    encode(folder / "long.mp4", (np.roll(base, 4 * i, axis=1) for i in range(240)), fps=30)
    encode(folder / "short.mp4", [base[:64, :64]] * 3)
    return folder


@pytest.mark.parametrize("mode, kept_mb", [
    ("sample", 8 * 1080 * 1920 * 3 / 2**20),
    # the 8 sampled frames and 32 dense ones share a few; all are decoded at full size, then the dense shrunk
    ("sample+dense", 40 * 1080 * 1920 * 3 / 2**20),
    ("all at 448", 240 * 448 * 448 * 3 / 2**20),
])
def test_reliability_decoding_a_long_1080p_video_stays_under_the_memory_bound(long_1080p, mode, kept_mb):
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(long_1080p / "short.mp4"), str(long_1080p / "long.mp4"),
                          mode], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) <= MEMORY_FACTOR * kept_mb + DECODER_MB


def test_reliability_a_video_that_hangs_times_out_and_the_batch_goes_on(checkpoint, demo_set, tmp_path):
    videos = [str(r.path) for r in read_split(demo_set, "val")][:2]
    hung = tmp_path / "hang.mp4"
    shutil.copy(videos[0], hung)
    expected = Scorer.from_pretrained(checkpoint).score(videos, progress=False)
    scorer = Scorer.from_pretrained(checkpoint, timeout_per_video=5)
    scorer.extractor.preparer = HangOn("hang", scorer.extractor.preparer)
    results = scorer.score([videos[0], str(hung), videos[1]], output=tmp_path / "r.jsonl", progress=False)
    assert results[1]["error"] == "timed out: not decoded within 5 s (--timeout-per-video)"
    assert [results[0]["score"], results[2]["score"]] == pytest.approx([r["score"] for r in expected], abs=1e-4)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3


def test_reliability_timeout_per_video_must_be_positive(capsys):
    assert main(["score", "x.mp4", "--timeout-per-video", "0"]) == 2
    assert "--timeout-per-video 0: give a positive number of seconds" in capsys.readouterr().err


def test_reliability_no_code_unpickles_weights_or_runs_remote_code():
    """Every torch.load passes weights_only=True and nothing sets trust_remote_code=True (checked in the
    source, so a new call cannot slip in); checkpoints themselves are safetensors (test_model.py)."""
    import ast
    from pathlib import Path

    import fvq_plugin

    loads = 0
    for file in Path(fvq_plugin.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            remote = keywords.get("trust_remote_code")
            assert not (isinstance(remote, ast.Constant) and remote.value is True), f"{file}:{node.lineno}"
            if isinstance(node.func, ast.Attribute) and node.func.attr == "load" and ast.unparse(node.func) == "torch.load":
                loads += 1
                only = keywords.get("weights_only")
                assert isinstance(only, ast.Constant) and only.value is True, f"{file}:{node.lineno}: {ast.unparse(node)}"
    assert loads >= 1  # SlowFast's .pyth files
