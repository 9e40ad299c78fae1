"""Temporal (motion) stream of FVQ-Rater: SlowFast-R50 over a dense clip of the whole video.

A clip of ``num_frames`` frames (default 32) is centre-cropped to ``size`` x ``size``, fed to
SlowFast-R50 as ``[slow, fast]`` with ``slow = fast[:, :, ::alpha]``, and both pathways are
average-pooled over time and space and concatenated: slow 2048 + fast 256 = 2304 features.

The network is pytorchvideo's ``slowfast_r50`` (the architecture of the Kinetics-400
``SLOWFAST_8x8_R50.pyth`` checkpoint) with two changes that add or remove no weights other than
the classifier:

* the fixed head pools ``AvgPool3d((8, 7, 7))`` / ``AvgPool3d((32, 7, 7))``, which only fit 224 x
  224 x 32 input, become ``AdaptiveAvgPool3d(1)`` (identical at 224 / 32 frames, and any size works);
* the 400-way Kinetics classifier ``blocks.6.proj`` becomes ``nn.Identity``.

Only ``pytorchvideo.models`` is imported: ``pytorchvideo.transforms`` (0.1.5) imports
``torchvision.transforms.functional_tensor``, which torchvision removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["TemporalFeatures", "build_slowfast_r50", "preprocess_clip"]

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
RANDOM_WARNING = (
    "random SlowFast weights: temporal features carry no learned motion information"
)
_IGNORED_PREFIX = "blocks.6.proj."  # the Kinetics classifier, dropped


def build_slowfast_r50() -> nn.Module:
    """SlowFast-R50 (Kinetics 8x8 architecture) returning pooled [B, 2304] features.

    Initialisation draws from torch's global RNG; seed it (or fork it) around this call.
    """
    with warnings.catch_warnings():
        # fvcore (imported by pytorchvideo) calls the deprecated torch.jit.script at import time.
        warnings.simplefilter("ignore", FutureWarning)
        from pytorchvideo.models.hub import slowfast_r50

    model = slowfast_r50(pretrained=False)
    pool_concat, head = model.blocks[5], model.blocks[6]
    pool_concat.pool = nn.ModuleList(
        [nn.AdaptiveAvgPool3d(1) for _ in pool_concat.pool]
    )
    head.proj = nn.Identity()
    # dropout is inactive in eval(); activation is None; output_pool (adaptive avg to 1) then
    # view(B, -1) gives [B, 2304].
    assert head.pool is None and head.activation is None, (
        "unexpected pytorchvideo head layout"
    )
    return model


def _sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_state_dict(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # re-raised with advice
        raise InputError(
            f"cannot load SlowFast weights {path!r} with torch.load(weights_only=True): {e}\n"
            "If you trust the file, convert it once to a plain state_dict: "
            "torch.save(torch.load(p, weights_only=False)['model_state'], 'slowfast_r50.pt')"
        ) from e
    if isinstance(ckpt, dict):
        for key in ("model_state", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise InputError(
            f"{path!r} is not a SlowFast-R50 state_dict (nor a checkpoint with 'model_state')"
        )
    return ckpt


def _load_weights(model: nn.Module, path: str) -> None:
    state = {
        k: v
        for k, v in _read_state_dict(path).items()
        if not k.startswith(_IGNORED_PREFIX)
    }
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(
            f"SlowFast weights {path!r} do not fit SlowFast-R50: {e}"
        ) from e
    if missing or unexpected:
        raise RuntimeError(
            f"SlowFast weights {path!r} do not match SlowFast-R50 (official SLOWFAST_8x8_R50 layout): "
            f"missing keys {sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )


def preprocess_clip(
    clip: np.ndarray, size: int = 224, num_frames: int = 32
) -> torch.Tensor:
    """uint8 [T, H, W, 3] RGB -> float32 [3, num_frames, size, size], Kinetics-normalised.

    Frames are resampled uniformly over the clip (first and last frame kept; repeated when
    T < num_frames). The centre square (side = short side) is cropped and resized to
    size x size with antialiased bilinear, i.e. short side -> size, then centre crop.
    Needs no model: use it (or `TemporalFeatures.preprocess`) in DataLoader workers.
    """
    from torchvision.transforms.v2.functional import resize

    clip = np.asarray(clip)
    if (
        clip.dtype != np.uint8
        or clip.ndim != 4
        or clip.shape[-1] != 3
        or clip.shape[0] < 1
    ):
        raise ValueError(
            f"expected a uint8 clip [T, H, W, 3], got {clip.dtype} {clip.shape}"
        )
    t, h, w, _ = clip.shape
    idx = np.linspace(0, t - 1, num_frames).round().astype(np.int64)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    frames = np.ascontiguousarray(clip[idx, top : top + s, left : left + s])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, 3, s, s] uint8
    if s != size:
        x = resize(x, [size, size], antialias=True)
    x = x.permute(1, 0, 2, 3).float().div_(255.0)  # [3, T, S, S]
    mean = torch.tensor(KINETICS_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD).view(3, 1, 1, 1)
    return x.sub_(mean).div_(std)


class TemporalFeatures:
    """SlowFast-R50 clip features, [B, 2304] float32 (slow 2048 + fast 256)."""

    dim = 2304

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        size: int = 224,
        num_frames: int = 32,
        alpha: int = 4,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if num_frames < 1 or alpha < 1 or num_frames % alpha:
            raise InputError(
                f"num_frames ({num_frames}) must be a positive multiple of alpha ({alpha})"
            )
        if size < 32:
            raise InputError(
                f"size must be >= 32 (SlowFast downsamples by 32), got {size}"
            )
        self.size, self.num_frames, self.alpha = int(size), int(num_frames), int(alpha)
        self.dtype = dtype

        if weights is not None:
            weights = os.fspath(weights)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"SlowFast weights file not found: {weights!r}")
            model = build_slowfast_r50()
            _load_weights(model, weights)
            self._weights_id = (
                f"{os.path.basename(weights)}@sha256:{_sha256(weights)[:16]}"
            )
        elif random_init:
            warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=2)
            logger.warning(RANDOM_WARNING)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_slowfast_r50()
            self._weights_id = f"random({seed})"
        else:
            raise InputError(
                "TemporalFeatures needs SlowFast weights: pass weights=PATH (the official "
                "SlowFast R50 Kinetics checkpoint SLOWFAST_8x8_R50.pyth, or a state_dict of it), "
                "or random_init=True (tests and demo only: features then carry no learned motion "
                "information)"
            )
        self.model = model.eval().to(device=torch.device(device), dtype=dtype)
        self.model.requires_grad_(False)

    def config(self) -> dict:
        """Everything that changes the output (a cache key)."""
        return {
            "model": "slowfast_r50/adaptive_avg_pool",
            "weights": self._weights_id,
            "size": self.size,
            "num_frames": self.num_frames,
            "alpha": self.alpha,
            "dtype": str(self.dtype).replace("torch.", ""),
            "preprocess": "uniform_t/center_square/bilinear_aa/kinetics_norm",
        }

    def preprocess(self, clip: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] RGB -> float32 [3, num_frames, size, size]; see `preprocess_clip`."""
        return preprocess_clip(clip, self.size, self.num_frames)

    @torch.no_grad()
    def __call__(self, clips: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """uint8 clips (a list) or preprocessed [B, 3, T, S, S] -> float32 [B, 2304] on CPU."""
        if torch.is_tensor(clips):
            x = clips
        else:
            clips = list(clips)
            if not clips:
                return torch.zeros(0, self.dim)
            x = torch.stack([self.preprocess(c) for c in clips])
        expected = (3, self.num_frames, self.size, self.size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected clips [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return torch.zeros(0, self.dim)
        # The model's own device, so that moving the model (e.g. a pyiqa metric's .to()) is enough.
        fast = x.to(device=next(self.model.parameters()).device, dtype=self.dtype)
        slow = fast[:, :, :: self.alpha]
        # The model rewrites its input list in place: always hand it a fresh one.
        out = self.model([slow, fast])
        return out.float().cpu()
