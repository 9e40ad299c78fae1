import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from fvq_plugin import train as training
from fvq_plugin.features import FeatureConfig
from fvq_plugin.model import FVQRater
from fvq_plugin.scoring import split_features
from fvq_plugin.tiny import tiny_rater
from fvq_plugin.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(demo_set, extractor, feature_cache):
    return (split_features(demo_set, "train", extractor, feature_cache, progress=False)[:2],
            split_features(demo_set, "val", extractor, feature_cache, progress=False)[:2])


def trained_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or not k.startswith("backbone.")}


@pytest.mark.reliability
def test_a_run_whose_validation_srcc_is_always_nan_still_writes_best(tmp_path, extractor, data):
    (train_features, train_mos), (val_features, val_mos) = data
    constant_val = (val_features, [50.0] * len(val_mos))  # constant MOS: SRCC is undefined every epoch
    with pytest.warns(RuntimeWarning, match="constant MOS"):
        result = train(tiny_rater(extractor), extractor.preparer.spatial, (train_features, train_mos), constant_val,
                       TrainConfig(stage=2, epochs=2, lr=1e-3), tmp_path, progress=False)
    assert all(r["val_srcc"] != r["val_srcc"] for r in result["history"])  # NaN
    best = json.loads((tmp_path / "best" / training.PROGRESS_FILE).read_text())
    assert best["epoch"] == 0 and FVQRater.from_pretrained(tmp_path / "best") is not None


def test_the_default_key_metric_prefers_spread_scores_to_compressed_ones_of_the_same_ranking():
    mos = [10.0, 30.0, 50.0, 70.0, 90.0]
    spread, compressed = [15.0, 25.0, 55.0, 65.0, 95.0], [48.0, 49.0, 50.0, 51.0, 52.0]
    key = {(scores, metric): training.validation_record(values, mos, metric)["val_key"]
           for scores, values in (("spread", spread), ("compressed", compressed)) for metric in ("srcc", "srcc-rmse")}
    assert key["spread", "srcc"] == pytest.approx(1.0) and key["compressed", "srcc"] == pytest.approx(1.0)
    assert key["spread", "srcc-rmse"] > key["compressed", "srcc-rmse"]
    with pytest.raises(ValueError, match="key_metric"):
        TrainConfig(key_metric="plcc")


def test_stages_write_best_and_last_checkpoints(tmp_path, extractor, data):
    model = tiny_rater(extractor)
    result = train(model, extractor.preparer.spatial, *data, TrainConfig(stage=1, epochs=2, lr=1e-3), tmp_path,
                   progress=False)
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert all({"loss", "lr", "val_srcc", "val_plcc", "val_rmse", "val_key", "seconds"} <= set(r)
               for r in result["history"])
    assert result["best"] in result["history"]
    assert result["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    for name in ("best", "last"):
        recorded = FVQRater.from_pretrained(tmp_path / name).config.features
        assert FeatureConfig.from_dict(recorded) == extractor.config
    assert (tmp_path / "last" / training.STATE_DIR).is_dir()


def test_stage_two_trains_the_head_and_stage_one_does_not(extractor, data, tmp_path):
    model = tiny_rater(extractor)
    head = model.score_head.output.weight.clone()
    train(model, extractor.preparer.spatial, *data, TrainConfig(stage=1, epochs=1, lr=1e-3), tmp_path / "1",
          progress=False)
    assert torch.equal(model.score_head.output.weight, head)
    train(model, extractor.preparer.spatial, *data, TrainConfig(stage=2, epochs=1, lr=1e-3), tmp_path / "2",
          progress=False)
    assert not torch.equal(model.score_head.output.weight, head)


@pytest.mark.reliability
def test_resuming_an_interrupted_run_gives_identical_results(tmp_path, extractor, data, monkeypatch):
    config = TrainConfig(stage=2, epochs=2, lr=1e-3, batch_size=4)
    whole = tiny_rater(extractor)
    train(whole, extractor.preparer.spatial, *data, config, tmp_path / "whole", progress=False)

    original = training._checkpoint

    def interrupt_after_first_epoch(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_checkpoint", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_rater(extractor), extractor.preparer.spatial, *data, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(training, "_checkpoint", original)
    resumed = tiny_rater(extractor)
    result = train(resumed, extractor.preparer.spatial, *data, config, tmp_path / "cut", resume=True, progress=False)
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    expected, actual = trained_state(whole), trained_state(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.reliability
def test_a_training_run_killed_while_checkpointing_resumes_to_the_uninterrupted_results(tmp_path, demo_set,
                                                                                      feature_cache, checkpoint):
    # `checkpoint` has filled the feature cache. The kill comes after epoch 2's weights and progress are
    # written and before its training state is: resuming from that mix would skip epoch 2.
    script = Path(__file__).with_name("killed_train.py")

    def run(out, mode):
        return subprocess.run([sys.executable, str(script), str(demo_set), str(feature_cache), str(out), mode],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert run(tmp_path / "whole", "whole").returncode == 0
    killed = run(tmp_path / "cut", "kill-at-save-2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "cut" / "last.partial").is_dir()  # the interrupted write, beside the intact last/
    assert json.loads((tmp_path / "cut" / "last" / training.PROGRESS_FILE).read_text())["epoch"] == 0
    resumed = run(tmp_path / "cut", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    histories = [json.loads((tmp_path / name / "history.json").read_text()) for name in ("whole", "cut")]
    assert [h[0] for h in histories[1]] == [1, 2, 3] and histories[0] == histories[1]
    expected, actual = (FVQRater.from_pretrained(tmp_path / name / "last", merge_lora=False).trained_state_dict()
                        for name in ("whole", "cut"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not list((tmp_path / "cut").glob("*.partial")) and not list((tmp_path / "cut").glob("*.old"))


def test_two_cpu_processes_train_together(tmp_path, demo_set, feature_cache, checkpoint):
    # `checkpoint` has filled the feature cache, so both ranks read features instead of computing them.
    script = Path(__file__).with_name("two_process_train.py")
    # accelerate 1.15's `--cpu` launches a single process unless MPI is set up; its torchrun launcher
    # (--multi_gpu) starts both, and on a machine without CUDA the trainer joins them over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), str(demo_set), str(feature_cache), str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted((tmp_path / "out").glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world"] == 2 for r in ranks)
    # Validation gathers both ranks' shards: every validation video is counted once.
    assert all(r["val_n"] == len(data_val_names(demo_set)) for r in ranks)
    # The cosine schedule ends at zero exactly when training ends, with any number of processes.
    assert all(r["lr"] == pytest.approx(0.0, abs=1e-9) for r in ranks)
    assert FVQRater.from_pretrained(tmp_path / "out" / "last").config.num_frames == 4


def data_val_names(demo_set):
    return (demo_set / "val" / "labels.txt").read_text().split()


def test_gradient_checkpointing_trains_the_same_parameters(tmp_path, extractor, data):
    model = tiny_rater(extractor)
    before = trained_state(model)
    train(model, extractor.preparer.spatial, *data, TrainConfig(stage=2, epochs=1, lr=1e-3, gradient_checkpointing=True),
          tmp_path, progress=False)
    assert model.vlm.is_activation_checkpointing
    after = trained_state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k and "vision_tower" in k for k in changed)
    assert any("lora_B" in k and "language_model" in k for k in changed) and "score_head.fc5.weight" in changed
