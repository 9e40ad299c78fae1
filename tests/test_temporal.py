"""Tests for the SlowFast-R50 temporal stream (small inputs: 64 x 64, 16 frames)."""

import logging
import warnings

import numpy as np
import pytest
import torch

from fvq_plugin.features.temporal import (
    KINETICS_MEAN,
    KINETICS_STD,
    RANDOM_WARNING,
    TemporalFeatures,
    preprocess_clip,
)

SIZE, FRAMES = 64, 16
KW = {"size": SIZE, "num_frames": FRAMES}


def _random(seed=0, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return TemporalFeatures(random_init=True, seed=seed, **{**KW, **kw})


@pytest.fixture(scope="module")
def tf():
    return _random(seed=0)


def _clip(seed, t=FRAMES, h=72, w=96):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _moving(t=FRAMES, h=72, w=96):
    base = _clip(123, t=1, h=h, w=w)[0]
    return np.stack([np.roll(base, 4 * i, axis=1) for i in range(t)])


def test_output_shape_dtype(tf):
    out = tf([_clip(1), _clip(2, t=9, h=50, w=40)])
    assert out.shape == (2, TemporalFeatures.dim) == (2, 2304)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert tf([]).shape == (0, 2304)


def test_batched_equals_single(tf):
    clips = [_clip(i) for i in range(3)]
    batched = tf(clips)
    single = torch.cat([tf([c]) for c in clips])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    # a preprocessed tensor gives the same, is left untouched, and repeats exactly
    x = torch.stack([tf.preprocess(c) for c in clips])
    x0 = x.clone()
    torch.testing.assert_close(tf(x), batched, rtol=0, atol=0)
    assert torch.equal(x, x0)
    torch.testing.assert_close(tf(x), batched, rtol=0, atol=0)


def test_seed_determinism_and_warning(tf, caplog):
    clip = [_clip(5)]
    with (
        caplog.at_level(logging.WARNING),
        pytest.warns(UserWarning, match="random SlowFast weights"),
    ):
        same = TemporalFeatures(random_init=True, seed=0, **KW)
    assert RANDOM_WARNING in caplog.text
    assert torch.equal(same(clip), tf(clip))
    other = _random(seed=1)
    assert not torch.allclose(other(clip), tf(clip))
    assert tf.config()["weights"] == "random(0)" and other.config() != tf.config()


def test_motion_differs_from_static(tf):
    moving = _moving()
    static = np.repeat(moving[:1], FRAMES, axis=0)
    a, b = tf([moving, static])
    assert (a - b).abs().max() > 1e-3 * b.abs().max()
    # the fast pathway (last 256 features) sees the motion too
    assert not torch.allclose(a[2048:], b[2048:])


def test_preprocess_resamples_and_crops(tf):
    t, h, w = 10, 48, 80
    clip = np.zeros((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        clip[i] = 20 * i
    clip[:, :, :16] = 255  # outside the centre square: cropped away
    clip[:, :, 64:] = 255
    x = tf.preprocess(clip)
    assert x.shape == (3, FRAMES, SIZE, SIZE) and x.dtype == torch.float32
    mean = torch.tensor(KINETICS_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD).view(3, 1, 1, 1)
    pixels = ((x * std + mean) * 255).round()
    expected = 20 * np.linspace(0, t - 1, FRAMES).round()
    for c in range(3):
        for j in range(FRAMES):
            assert torch.all(pixels[c, j] == expected[j])
    # longer clips are subsampled, keeping first and last frame
    long = np.stack([np.full((40, 40, 3), i, np.uint8) for i in range(100)])
    y = (tf.preprocess(long) * std + mean) * 255
    firsts = y[0, :, 0, 0].round()
    assert firsts[0] == 0 and firsts[-1] == 99 and torch.all(firsts.diff() > 0)
    with pytest.raises(ValueError, match="uint8"):
        tf.preprocess(clip.astype(np.float32))
    with pytest.raises(ValueError, match="expected clips"):
        tf(torch.zeros(1, 3, FRAMES + 4, SIZE, SIZE))


def test_preprocess_in_dataloader_worker(tf):
    clips = [_clip(i, t=12, h=40, w=60) for i in range(2)]
    loader = torch.utils.data.DataLoader(
        clips,
        batch_size=2,
        num_workers=1,
        collate_fn=lambda b: torch.stack([preprocess_clip(c, SIZE, FRAMES) for c in b]),
    )
    (x,) = list(loader)
    assert torch.equal(x, torch.stack([tf.preprocess(c) for c in clips]))


def test_missing_weights_error():
    with pytest.raises(ValueError, match=r"weights=PATH.*random_init=True"):
        TemporalFeatures(**KW)
    with pytest.raises(FileNotFoundError):
        TemporalFeatures(weights="/nonexistent/SLOWFAST_8x8_R50.pyth", **KW)


def test_load_plain_state_dict(tf, tmp_path):
    path = tmp_path / "slowfast_plain.pt"
    torch.save(tf.model.state_dict(), path)
    loaded = TemporalFeatures(weights=path, **KW)
    clip = [_clip(7)]
    assert torch.equal(loaded(clip), tf(clip))
    cfg = loaded.config()
    assert (
        cfg["weights"].startswith("slowfast_plain.pt@sha256:") and cfg["size"] == SIZE
    )


def test_load_official_layout_checkpoint(tf, tmp_path):
    """An untouched pytorchvideo slowfast_r50 (400-way proj included), wrapped like the .pyth."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from pytorchvideo.models.hub import slowfast_r50
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same init as the fixture
        state = slowfast_r50(pretrained=False).state_dict()
    assert state["blocks.6.proj.weight"].shape == (400, 2304)
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": state, "epoch": 196, "cfg": "MODEL: ..."}, path)
    loaded = TemporalFeatures(weights=path, **KW)
    clip = [_clip(8)]
    assert torch.equal(loaded(clip), tf(clip))


def test_bad_state_dict_keys(tf, tmp_path):
    state = dict(tf.model.state_dict())
    state["blocks.9.extra.weight"] = torch.zeros(3)
    del state["blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight"]
    path = tmp_path / "bad.pt"
    torch.save({"model_state": state}, path)
    with pytest.raises(RuntimeError) as err:
        TemporalFeatures(weights=path, **KW)
    assert "blocks.9.extra.weight" in str(err.value)
    assert "blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight" in str(
        err.value
    )
