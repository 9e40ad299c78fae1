"""Tests for the SlowFast-R50 temporal stream (kinetics mode: small inputs, 64 x 64, 16 frames;
finevq mode: mostly 224 x 224, one run at FineVQ's 448)."""

import logging
import warnings

import numpy as np
import pytest
import torch

from fvq_plugin.errors import InputError
from fvq_plugin.features.temporal import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINETICS_MEAN,
    KINETICS_STD,
    RANDOM_WARNING,
    FineVQPool,
    TemporalFeatures,
    finevq_frame_indices,
    finevq_slow_indices,
    preprocess_clip,
    preprocess_clip_finevq,
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


# --- FineVQ convention (preprocess="finevq") ---------------------------------------------------
# The references below copy FineVQ's code (github.com/IntMeGroup/FineVQ): get_index / load_video2
# (internvl/train/inference.py), dynamic_preprocess / build_transform (internvl/train/dataset.py),
# pack_pathway_output / class slowfast (internvl/model/internvl_chat_infer/modeling_internvl_chat.py).

FQ_SIZE = 224  # FineVQ uses 448 (test_finevq_448); 224 is the smallest its 7x7 pool allows, 4x faster


def _finevq_get_index(bound, fps, max_frame, first_idx=0, num_segments=8):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array([
        int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
        for idx in range(num_segments)
    ])
    return frame_indices


def _finevq_load_video2_indices(n_frames, fps=30.0):
    max_frame = n_frames - 1
    num_segments = 32 if n_frames < 32 else n_frames
    return _finevq_get_index(None, fps, max_frame, first_idx=0, num_segments=num_segments)


def _finevq_reference_pixels(clip, input_size=448):
    """FineVQ's pixel_values2 [T, 3, 448, 448] for the frames of `clip`, with PIL and torchvision."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms.functional import InterpolationMode

    transform = T.Compose([
        T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
        T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    images = []
    for i in _finevq_load_video2_indices(len(clip)):
        img = Image.fromarray(clip[i]).convert("RGB")
        # dynamic_preprocess(img, image_size=448, use_thumbnail=True, max_num=1): target ratio (1, 1)
        images.append(img.resize((input_size, input_size)).crop((0, 0, input_size, input_size)))
    return torch.stack([transform(image) for image in images])


def _finevq_pack_pathway_output(frames):
    slow_pathway = torch.index_select(
        frames, 2, torch.linspace(0, frames.shape[2] - 1, frames.shape[2] // 4).long().to(frames.device)
    )
    fast_pathway = frames[:, :, : slow_pathway.shape[2] * 4, :, :]
    return [slow_pathway, fast_pathway]


class _FineVQSlowFast(torch.nn.Module):
    """FineVQ's `slowfast` module around an untouched pytorchvideo slowfast_r50."""

    def __init__(self, slowfast_model):
        super().__init__()
        features = torch.nn.Sequential(*list(slowfast_model.children())[0])
        self.feature_extraction = torch.nn.Sequential()
        self.slow_avg_pool = torch.nn.Sequential()
        self.fast_avg_pool = torch.nn.Sequential()
        self.adp_avg_pool = torch.nn.Sequential()
        for x in range(0, 5):
            self.feature_extraction.add_module(str(x), features[x])
        self.slow_avg_pool.add_module("slow_avg_pool", features[5].pool[0])
        self.fast_avg_pool.add_module("fast_avg_pool", features[5].pool[1])
        self.adp_avg_pool.add_module("adp_avg_pool", features[6].output_pool)

    def forward(self, x):
        with torch.no_grad():
            x = self.feature_extraction(x)
            slow_feature = self.slow_avg_pool(x[0])
            fast_feature = self.fast_avg_pool(x[1])
            slow_feature = self.adp_avg_pool(slow_feature)
            fast_feature = self.adp_avg_pool(fast_feature)
            feature_3D = torch.cat([slow_feature, fast_feature], dim=1)
        return feature_3D


@pytest.fixture(scope="module")
def fq():
    return _random(seed=0, preprocess="finevq", size=FQ_SIZE, num_frames=None)


@pytest.fixture(scope="module")
def finevq_reference():
    """FineVQ's module, with the weights of the seed-0 fixtures."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from pytorchvideo.models.hub import slowfast_r50
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _FineVQSlowFast(slowfast_r50(pretrained=False)).eval()


def test_finevq_frame_indices_follow_get_index():
    for n in [1, 2, 3, 10, 31, 32, 33, 63, 100, 299, 300, 301, 1199, 1201]:
        ours = finevq_frame_indices(n)
        assert ours.dtype == np.int64
        assert ours.tolist() == _finevq_load_video2_indices(n).tolist(), n
        assert len(ours) == max(n, 32) and ours.min() >= 0 and ours.max() <= (n - 2 if n >= 32 else n - 1)
    # every frame but the last, one taken twice; shorter videos repeat frames up to 32
    idx = finevq_frame_indices(300)
    assert sorted(set(idx.tolist())) == list(range(299)) and np.all(np.diff(idx) >= 0)
    assert finevq_frame_indices(1).tolist() == [0] * 32
    assert sorted(set(finevq_frame_indices(10).tolist())) == list(range(10))


def test_finevq_slow_indices_follow_pack_pathway_output(fq):
    for t in range(32, 420):
        assert torch.equal(finevq_slow_indices(t), torch.linspace(0, t - 1, t // 4).long()), t
    # what the network receives: frame j holds the value j
    t = 38
    x = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1).expand(1, 3, t, FQ_SIZE, FQ_SIZE)
    seen = []

    class Stop(Exception):
        pass

    def grab(module, args):
        seen.extend(p.clone() for p in args[0])
        raise Stop

    handle = fq.model.blocks[0].register_forward_pre_hook(grab)
    try:
        with pytest.raises(Stop):
            fq(x)
    finally:
        handle.remove()
    slow, fast = seen
    reference = _finevq_pack_pathway_output(x)
    assert torch.equal(slow, reference[0]) and torch.equal(fast, reference[1])
    assert slow[0, 0, :, 0, 0].tolist() == finevq_slow_indices(t).tolist()
    assert fast.shape[2] == 36 and fast[0, 0, :, 0, 0].tolist() == list(range(36))


def test_finevq_preprocess_is_finevqs_transform():
    clip = _clip(3, t=10, h=60, w=90)  # non-square, fewer than 32 frames
    x = preprocess_clip_finevq(clip)
    assert x.shape == (3, 32, 448, 448) and x.dtype == torch.float32
    reference = _finevq_reference_pixels(clip).permute(1, 0, 2, 3)  # FineVQ's frames.permute(0, 2, 1, 3, 4)
    assert torch.equal(x, reference)
    # all frames of longer videos (FineVQ's get_index), and size x size frames are not resampled
    long = np.stack([np.full((448, 448, 3), i, np.uint8) for i in range(40)])
    y = preprocess_clip_finevq(long)
    assert y.shape == (3, 40, 448, 448)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    grey = ((y * std + mean) * 255).round()
    assert grey[:, :, 0, 0].tolist() == [finevq_frame_indices(40).tolist()] * 3
    assert torch.all(grey == grey[:, :, :1, :1])
    # stretched, not cropped: a bright left edge stays on the left, over ~1/9 of the width
    edge = np.zeros((32, 60, 90, 3), np.uint8)
    edge[:, :, :10] = 255
    z = (preprocess_clip_finevq(edge, 224) * std + mean)[0, 0]
    assert z.shape == (224, 224)
    assert torch.all(z[:, :20] > 0.99) and torch.all(z[:, 30:] < 0.01)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_clip_finevq(clip.astype(np.float32))


def test_finevq_pool_is_fixed_kernels_then_average(fq):
    pool = fq.model.blocks[5]
    assert isinstance(pool, FineVQPool)
    assert [(p.kernel_size, p.stride, p.padding) for p in pool.pool] == [
        ((8, 7, 7), (1, 1, 1), (0, 0, 0)),
        ((32, 7, 7), (1, 1, 1), (0, 0, 0)),
    ]
    g = torch.Generator().manual_seed(0)
    slow, fast = torch.rand(2, 5, 9, 14, 14, generator=g), torch.rand(2, 3, 36, 14, 14, generator=g)
    out = pool([slow, fast])
    expected = torch.cat([
        torch.nn.functional.avg_pool3d(slow, (8, 7, 7), stride=1).mean((2, 3, 4)),
        torch.nn.functional.avg_pool3d(fast, (32, 7, 7), stride=1).mean((2, 3, 4)),
    ], 1)
    assert out.shape == (2, 8, 1, 1, 1)
    torch.testing.assert_close(out.flatten(1), expected)
    # not a global average: window overlaps weight the centre more
    plain = torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], 1)
    assert not torch.allclose(out.flatten(1), plain)


def test_finevq_features_variable_lengths(fq, finevq_reference):
    short, long = _clip(11, t=10, h=40, w=60), _clip(12, t=38, h=50, w=40)
    x_long = fq.preprocess(long)
    assert fq.preprocess(short).shape == (3, 32, FQ_SIZE, FQ_SIZE)
    assert x_long.shape == (3, 38, FQ_SIZE, FQ_SIZE)
    # a list may mix lengths, and uint8 clips with preprocessed [3, T, S, S] tensors
    out = fq([short, x_long])
    assert out.shape == (2, 2304) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # FineVQ's own module on FineVQ's own pixels gives the same features
    frames = _finevq_reference_pixels(long, FQ_SIZE).permute(1, 0, 2, 3)[None]
    assert torch.equal(frames[0], x_long)
    reference = finevq_reference(_finevq_pack_pathway_output(frames))
    assert reference.shape == (1, 2304, 1, 1, 1)
    torch.testing.assert_close(out[1:], reference.view(1, -1), rtol=1e-5, atol=1e-6)
    assert fq([]).shape == (0, 2304)
    with pytest.raises(ValueError, match=r"T >= 32"):
        fq(torch.zeros(1, 3, 28, FQ_SIZE, FQ_SIZE))
    with pytest.raises(ValueError, match="expected clips"):
        fq(torch.zeros(1, 3, 32, 448, 448))


def test_finevq_448(finevq_reference):
    tf448 = _random(seed=0, preprocess="finevq", size=None, num_frames=None)
    assert tf448.size == 448 and tf448.num_frames == 32
    maps = []
    handle = tf448.model.blocks[4].register_forward_hook(lambda m, a, out: maps.extend(out))
    clip = _clip(13, t=6, h=30, w=40)
    x = tf448.preprocess(clip)
    assert x.shape == (3, 32, 448, 448)
    try:
        out = tf448(x[None])  # a preprocessed [B, 3, T, S, S] tensor
    finally:
        handle.remove()
    assert out.shape == (1, 2304) and torch.isfinite(out).all()
    slow, fast = maps
    assert slow.shape == (1, 2048, 8, 14, 14) and fast.shape == (1, 256, 32, 14, 14)
    ref = finevq_reference
    head = torch.cat([ref.adp_avg_pool(ref.slow_avg_pool(slow)), ref.adp_avg_pool(ref.fast_avg_pool(fast))], 1)
    torch.testing.assert_close(out, head.view(1, -1), rtol=1e-6, atol=1e-7)


def test_finevq_config_and_arguments(tf, fq):
    # the kinetics key is unchanged (it keys existing feature caches)
    assert tf.config() == {
        "model": "slowfast_r50/adaptive_avg_pool", "weights": "random(0)", "size": SIZE,
        "num_frames": FRAMES, "alpha": 4, "dtype": "float32",
        "preprocess": "uniform_t/center_square/bilinear_aa/kinetics_norm",
    }
    assert fq.config()["weights"] == tf.config()["weights"]
    assert fq.config()["model"] != tf.config()["model"]
    assert fq.config()["preprocess"] != tf.config()["preprocess"]
    assert _random(seed=0, size=FQ_SIZE, num_frames=32).config() != fq.config()
    with pytest.raises(InputError, match="preprocess"):
        TemporalFeatures(random_init=True, preprocess="bogus")
    with pytest.raises(InputError, match="num_frames"):
        TemporalFeatures(random_init=True, preprocess="finevq", num_frames=16)
    with pytest.raises(InputError, match="224"):
        TemporalFeatures(random_init=True, preprocess="finevq", size=128)
    with pytest.warns(UserWarning, match="FineVQ uses 448"), pytest.raises(FileNotFoundError):
        TemporalFeatures(weights="/nonexistent.safetensors", preprocess="finevq", size=FQ_SIZE)


def test_safetensors_weights(tf, fq, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "slowfast_r50.safetensors"
    save_file(tf.model.state_dict(), str(path))
    loaded = TemporalFeatures(weights=path, **KW)
    clip = [_clip(7)]
    assert torch.equal(loaded(clip), tf(clip))
    assert loaded.config()["weights"].startswith("slowfast_r50.safetensors@sha256:")
    # the same file serves the finevq head (same keys)
    with pytest.warns(UserWarning, match="FineVQ uses 448"):
        finevq = TemporalFeatures(weights=path, preprocess="finevq", size=FQ_SIZE)
    mine, theirs = finevq.model.state_dict(), fq.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InputError, match="safetensors"):
        TemporalFeatures(weights=bad, **KW)


def test_finevq_slowfast_keys_convert_to_pytorchvideos_layout(tf, finevq_reference, tmp_path):
    from safetensors.torch import save_file

    from fvq_plugin.convert import ConversionReport, export_temporal_weights
    from fvq_plugin.recipe import FINEVQ

    # FineVQ's checkpoint holds its `slowfast` module as InternVLChatModel.slowfast_model
    finevq_state = {f"slowfast_model.{k}": v for k, v in finevq_reference.state_dict().items()}
    assert all(k.startswith(FINEVQ.release_temporal) for k in finevq_state)
    report = ConversionReport("finevq")
    state = export_temporal_weights(dict(finevq_state), FINEVQ.release_temporal, report)
    expected = tf.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert report.clean
    path = tmp_path / "finevq_slowfast.safetensors"
    save_file(state, str(path))
    loaded = TemporalFeatures(weights=path, **KW)
    assert torch.equal(loaded([_clip(9)]), tf([_clip(9)]))
    gone = "slowfast_model.feature_extraction.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight"
    extra = {k: v for k, v in finevq_state.items() if k != gone}
    extra["slowfast_model.feature_extraction.4.extra.weight"] = torch.zeros(1)
    report = ConversionReport("finevq")
    export_temporal_weights(extra, FINEVQ.release_temporal, report)
    assert report.unmatched_source == ["slowfast_model.feature_extraction.4.extra.weight"]
    assert report.missing_target == [gone.replace(FINEVQ.release_temporal, "temporal: blocks.")]
    # a FineVQ-keyed file given directly says how to convert it
    raw = tmp_path / "finevq_raw.safetensors"
    save_file({k: v.contiguous() for k, v in finevq_reference.state_dict().items()
               if k.startswith("feature_extraction.0.")} | {
        "slowfast_model.feature_extraction.0.multipathway_blocks.0.conv.weight": torch.zeros(1)}, str(raw))
    with pytest.raises(RuntimeError, match="fvq-rater convert SRC DST --recipe finevq"):
        TemporalFeatures(weights=raw, **KW)


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_all_frames(tmp_path, backend):
    from fvq_plugin.video import VideoReadError, all_frames, write_video

    path = tmp_path / "ramp.mp4"
    if not path.exists():
        write_video(path, (np.full((48, 64, 3), 6 * i, np.uint8) for i in range(40)), fps=24)
    clip = all_frames(path, backend=backend)
    assert clip.frames.shape == (40, 48, 64, 3) and clip.indices.tolist() == list(range(40))
    assert clip.info.n_frames == 40 and not clip.repeated
    assert np.abs(clip.frames.mean(axis=(1, 2, 3)) - 6 * np.arange(40)).max() < 3  # in order
    stretched = all_frames(path, backend=backend, size=448)
    assert stretched.frames.shape == (40, 448, 448, 3)
    # decoding already at 448 gives FineVQ's preprocessing of the full-size frames
    assert torch.equal(preprocess_clip_finevq(stretched.frames), preprocess_clip_finevq(clip.frames))
    with pytest.raises(VideoReadError, match="max_frames=39"):
        all_frames(path, backend=backend, max_frames=39)
    image = tmp_path / "still.png"
    from PIL import Image

    Image.fromarray(np.full((30, 20, 3), 77, np.uint8)).save(image)
    still = all_frames(image, size=(64, 32))
    assert still.frames.shape == (1, 32, 64, 3) and still.info.backend == "image"
