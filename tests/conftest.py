import os

# Every hub lookup would otherwise wait ~60 s for a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Each of `pytest -n N`'s workers (and the processes it starts) gets its share of the cores. With torch's default,
# every worker's OpenMP pool spans all cores: on 2 cores test_train.py took 137 s under -n 2, with one thread
# per worker 66 s.
if "PYTEST_XDIST_WORKER" in os.environ:  # not in the controller, whose environment the workers inherit
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import socket  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

# Small everywhere (32-px frames, 4 per video, a short SlowFast clip): the production code paths, fast.
TINY_FEATURES = dict(num_frames=4, image_size=32, face_backend="yunet-sface", temporal_random=True, temporal_preprocess="kinetics",
                     temporal_size=32, temporal_frames=8)


def free_port() -> int:
    """A port for a torch.distributed group, so that runs in parallel (pytest -n) never share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_demo_set(tmp_path_factory, size: int = 64):
    """A 60-video demo set (9 test videos) of 12 frames of `size` pixels."""
    from fvq_plugin.demo_data import build_demo_set

    root = tmp_path_factory.mktemp(f"demo-{size}") / "data"
    build_demo_set(root, n_videos=60, seed=0, frames=12, size=size, progress=False)
    return root


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    return small_demo_set(tmp_path_factory)


@pytest.fixture(scope="session")
def extractor():
    from fvq_plugin.features import FeatureConfig, FeatureExtractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loud random-SlowFast warning is tested elsewhere
        return FeatureExtractor(FeatureConfig(**TINY_FEATURES))


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, demo_set, extractor, feature_cache):
    """A tiny FVQ-Rater trained through both stages on the demo set (once per test session)."""
    from fvq_plugin.scoring import split_features
    from fvq_plugin.tiny import tiny_rater
    from fvq_plugin.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    train_set = split_features(demo_set, "train", extractor, feature_cache, progress=False)[:2]
    val_set = split_features(demo_set, "val", extractor, feature_cache, progress=False)[:2]
    model = tiny_rater(extractor)
    for stage, epochs in ((1, 1), (2, 2)):
        train(model, extractor.preparer.spatial, train_set, val_set, TrainConfig(stage=stage, epochs=epochs, lr=1e-3),
              out / f"stage{stage}", progress=False)
    return out / "stage2" / "last"
