"""Portrait stream on real images shipped with scikit-image and insightface."""
import json
import pickle
import re
from importlib.resources import files

import cv2
import numpy as np
import pytest
from PIL import Image

from fvq_plugin.features.portrait import BACKGROUND, PortraitFeatures


def _image(package, *parts) -> np.ndarray:
    return np.asarray(Image.open(files(package).joinpath(*parts)).convert("RGB"))


@pytest.fixture(scope="module")
def images():
    return {
        "astronaut": _image("skimage", "data", "astronaut.png"),    # 512x512, a person
        "hanks": _image("insightface", "data", "images", "Tom_Hanks_54745.png"),  # 112x112 face
        "coffee": _image("skimage", "data", "coffee.png"),          # a cup on a table
        "rocket": _image("skimage", "data", "rocket.jpg"),          # a launch pad, nobody
    }


@pytest.fixture(scope="module")
def portrait():
    return PortraitFeatures()


def test_background_is_the_imagenet_mean_colour():
    assert BACKGROUND == (124, 116, 104)


def test_astronaut_is_a_person_and_the_matte_covers_her(portrait, images):
    alpha = portrait.matte(images["astronaut"][None])[0]
    _, person = portrait(images["astronaut"][None])
    assert person.tolist() == [True]
    assert alpha[60:180, 180:280].mean() > 0.9                      # her face
    assert alpha[:64, :64].mean() < 0.05 and alpha[:64, -64:].mean() < 0.05  # flag, shuttle
    coffee = portrait.matte(images["coffee"][None])[0]
    assert alpha.mean() > 2 * coffee.mean()                         # 0.54 vs 0.20


def test_tom_hanks_is_a_person(portrait, images):
    _, person = portrait(images["hanks"][None])
    assert person.tolist() == [True]


def test_coffee_is_weak_foreground_not_a_person_signal(portrait, images):
    # The selfie model is a foreground matter that assumes a person is present: it keeps the
    # cup (~19% of the frame, alpha mean ~0.20), so the default flags coffee as a person.
    # An area floor of 0.3 rejects it while the astronaut (~55%) still passes.
    alpha = portrait.matte(images["coffee"][None])[0]
    assert 0.1 < (alpha > 0.5).mean() < 0.3
    strict = PortraitFeatures(min_person_fraction=0.3)
    assert strict(images["coffee"][None])[1].tolist() == [False]
    assert strict(images["astronaut"][None])[1].tolist() == [True]


def test_batch_shapes_and_dtypes(portrait, images):
    frames = np.stack([cv2.resize(images[k], (160, 120), interpolation=cv2.INTER_AREA)
                       for k in ("astronaut", "hanks", "coffee", "rocket")])
    alpha = portrait.matte(frames)
    portraits, person = portrait(frames)
    assert alpha.shape == (4, 120, 160) and alpha.dtype == np.float32
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0
    assert portraits.shape == frames.shape and portraits.dtype == np.uint8
    assert person.shape == (4,) and person.dtype == bool
    assert person[0] and person[1] and not person[3]


def test_frame_without_a_person_is_returned_unmasked(portrait, images):
    rocket = images["rocket"][None]
    portraits, person = portrait(rocket)
    assert person.tolist() == [False]
    np.testing.assert_array_equal(portraits, rocket)


def test_background_becomes_the_fill_colour_and_the_person_is_kept(portrait, images):
    frame = images["astronaut"]
    alpha = portrait.matte(frame[None])[0]
    portraits, _ = portrait(frame[None])
    background, foreground = alpha == 0, alpha == 1
    assert background.sum() > 5000 and foreground.sum() > 50000
    assert (portraits[0][background] == BACKGROUND).all()
    assert np.abs(portraits[0][foreground].astype(int) - frame[foreground]).max() <= 1


def test_config_is_a_stable_cache_key(portrait):
    config = portrait.config()
    assert config == PortraitFeatures().config()
    assert config["model"] == "selfie_segmentation.tflite"
    assert config["model_sha256"] == "9ee168ec7c8f2a16"
    assert json.loads(json.dumps(config)) == config
    assert PortraitFeatures(threshold=0.6).config() != config
    assert PortraitFeatures(min_person_fraction=0.3).config() != config


def test_pickle_round_trip_rebuilds_the_interpreter(portrait, images):
    frames = images["hanks"][None]
    clone = pickle.loads(pickle.dumps(portrait))
    assert clone._interpreter is None                  # dropped, rebuilt on first use
    for got, want in zip(clone(frames), portrait(frames)):
        np.testing.assert_array_equal(got, want)


def test_user_model_path_is_used_and_keyed(portrait, images, tmp_path):
    custom = tmp_path / "custom.tflite"
    custom.write_bytes(portrait.model_path.read_bytes())
    user = PortraitFeatures(model_path=custom)
    assert user.config()["model"] == "custom.tflite"
    np.testing.assert_array_equal(user.matte(images["hanks"][None]), portrait.matte(images["hanks"][None]))


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope.tflite"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        PortraitFeatures(model_path=missing)


def test_rejects_frames_that_are_not_uint8_rgb(portrait, images):
    with pytest.raises(ValueError, match="uint8"):
        portrait(images["hanks"][None].astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        portrait(images["hanks"])                      # a single frame, not a batch
