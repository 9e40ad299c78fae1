import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
import skimage
import torch

import fvq_plugin  # noqa: F401  (registers fvq_rater)
import pyiqa
from fvq_plugin.data import read_split
from fvq_plugin.model import CheckpointError
from fvq_plugin.scoring import Scorer
from fvq_plugin.video import VideoReadError, sample_frames

ASTRONAUT = Path(skimage.__file__).parent / "data" / "astronaut.png"


@pytest.fixture(scope="module")
def metric(checkpoint):
    return pyiqa.create_metric("fvq_rater", device="cpu", pretrained_model_path=str(checkpoint))


@pytest.fixture(scope="module")
def videos(demo_set):
    return [str(r.path) for r in read_split(demo_set, "test")][:3]


def test_registered_like_any_pyiqa_metric(metric):
    assert "fvq_rater" in pyiqa.list_models() and "fvq_rater" in pyiqa.list_models(metric_mode="NR")
    assert metric.lower_better is False and metric.score_range == "0, 100" and metric.metric_mode == "NR"
    assert isinstance(metric.net, torch.nn.Module)


def test_video_path_and_list_of_paths_match_the_scorer(metric, videos, checkpoint):
    one = metric(videos[0])
    assert one.shape == (1,) and 0 <= one.item() <= 100
    batch = metric(videos)
    assert batch.shape == (3,) and batch[0] == one[0]
    expected = [r["score"] for r in Scorer.from_pretrained(checkpoint).score(videos, progress=False)]
    assert batch.tolist() == pytest.approx(expected, abs=1e-5)


def test_frame_tensor_is_one_video(metric, videos):
    clip = sample_frames(videos[0], 12)
    frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 255
    score = metric(frames)
    assert score.shape == (1,)
    assert score.item() == pytest.approx(metric(frames.unsqueeze(0)).item())  # [B,T,3,H,W] with B = 1


def test_image_path_and_image_tensor_are_one_frame_videos(metric):
    assert metric(str(ASTRONAUT)).shape == (1,)
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    # A file's dense clip for SlowFast is shrunk while decoding, a tensor's in one resize: a hair apart.
    assert metric(image).item() == pytest.approx(metric(str(ASTRONAUT)).item(), abs=0.05)


def test_inference_conventions(metric, videos):
    with torch.no_grad():
        assert metric.to("cpu")(videos[0]).shape == (1,)


def test_unreadable_video_is_an_error_not_a_score(metric, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="broken.mp4"):
        metric(str(broken))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric(torch.full((2, 3, 8, 8), 2.0))


def test_weights_from_the_environment(checkpoint, monkeypatch, videos):
    monkeypatch.setenv("FVQ_RATER_WEIGHTS", str(checkpoint))
    assert pyiqa.create_metric("fvq_rater", device="cpu")(videos[0]).shape == (1,)


def test_missing_weights_fail_at_once_with_the_fix(monkeypatch):
    monkeypatch.delenv("FVQ_RATER_WEIGHTS", raising=False)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="FVQ_RATER_WEIGHTS") as error:
        pyiqa.create_metric("fvq_rater", device="cpu")
    assert time.perf_counter() - started < 5
    assert "pretrained_model_path" in str(error.value) and "fvq-rater demo" in str(error.value)


def test_wrong_path_and_other_models_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not an FVQ-Rater checkpoint"):
        pyiqa.create_metric("fvq_rater", device="cpu", pretrained_model_path=str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(CheckpointError, match="not an FVQ-Rater checkpoint"):
        pyiqa.create_metric("fvq_rater", device="cpu", pretrained_model_path=str(tmp_path))


def test_pyiqa_metrics_still_work_after_our_import():
    piqe = pyiqa.create_metric("piqe", device="cpu")
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    assert piqe(image).numel() == 1
    assert piqe(str(ASTRONAUT)).numel() == 1  # pyiqa's own path reading is untouched


@pytest.mark.parametrize("statement", ["import fvq_plugin, pyiqa", "import pyiqa, fvq_plugin"])
def test_registration_works_in_either_import_order(statement):
    code = f"{statement}; print('fvq_rater' in pyiqa.list_models())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("True")


def test_importing_fvq_plugin_does_not_import_pyiqa():
    code = "import sys, fvq_plugin; print('pyiqa' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


def test_the_pyiqa_code_our_input_hook_relies_on_is_unchanged():
    """Fails when a pyiqa release moves what fvq_plugin.integrations.pyiqa_inputs wraps."""
    from pyiqa.models.inference_model import InferenceModel

    original = inspect.unwrap(InferenceModel._prepare_inputs)
    assert list(inspect.signature(original).parameters) == ["self", "target", "ref"]
    forward = inspect.getsource(InferenceModel.forward)
    assert "target, ref = self._prepare_inputs(target, ref)" in forward
    assert "self.net(target.to(device), **kwargs)" in forward
    assert pyiqa.__version__ == "0.1.16"
