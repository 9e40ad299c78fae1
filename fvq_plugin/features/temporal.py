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

With ``preprocess="finevq"`` the stream follows FineVQ (IntMeGroup/FineVQ, CVPR 2025) instead, so
that a checkpoint converted from FineVQ sees exactly FineVQ's motion features: every frame of the
video (``video.all_frames``; 32 frames resampled by FineVQ's ``get_index`` when shorter), each
stretched without cropping to 448 x 448 by PIL's bicubic resize, ImageNet-normalised; the slow
pathway picks ``torch.linspace(0, T - 1, T // 4).long()`` and the fast one keeps the first
``(T // 4) * 4`` frames; the head keeps pytorchvideo's fixed ``AvgPool3d((8, 7, 7))`` /
``AvgPool3d((32, 7, 7))`` (stride 1) and then averages each pathway to one value per channel.
FineVQ's inference runs SlowFast in bfloat16 (``torch_dtype=torch.bfloat16``, inputs cast to
bfloat16) on CUDA: pass ``dtype=torch.bfloat16`` to follow its numerics too.

Only ``pytorchvideo.models`` is imported: ``pytorchvideo.transforms`` (0.1.5) imports
``torchvision.transforms.functional_tensor``, which torchvision removed.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..common import file_digest
from ..errors import InputError
from ..recipe import TEMPORAL_PREPROCESSING
from ..video import internvl_indices, stretch
from .spatial import IMAGENET_MEAN, IMAGENET_STD  # FineVQ's too: internvl/train/constants.py

logger = logging.getLogger(__name__)

__all__ = [
    "TemporalFeatures",
    "build_slowfast_r50",
    "preprocess_clip",
    "preprocess_clip_finevq",
    "finevq_frame_indices",
    "finevq_slow_indices",
    "FineVQPool",
]

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
FINEVQ_SIZE = 448
FINEVQ_MIN_FRAMES = 32
RANDOM_WARNING = (
    "random SlowFast weights: temporal features carry no learned motion information"
)
_IGNORED_PREFIX = "blocks.6.proj."  # the Kinetics classifier, dropped


class FineVQPool(nn.Module):
    """FineVQ's pooling of the two pathways into [B, 2304, 1, 1, 1] (slow 2048, then fast 256).

    Each pathway goes through pytorchvideo's fixed ``AvgPool3d`` (kernel (8, 7, 7) slow,
    (32, 7, 7) fast, stride 1, no padding: FineVQ's ``slow_avg_pool`` / ``fast_avg_pool``) and
    then ``AdaptiveAvgPool3d(1)`` (its ``adp_avg_pool``); the two are concatenated on channels.
    This is not a plain global average: the sliding windows weight border positions less.
    """

    def __init__(self, pools: Sequence[nn.Module] | None = None):
        super().__init__()
        if pools is None:
            pools = [
                nn.AvgPool3d(k, stride=(1, 1, 1), padding=(0, 0, 0))
                for k in ((8, 7, 7), (32, 7, 7))
            ]
        self.pool = nn.ModuleList(pools)
        self.output_pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [self.output_pool(pool(xi)) for pool, xi in zip(self.pool, x)], dim=1
        )


def build_slowfast_r50(head: str = "adaptive") -> nn.Module:
    """SlowFast-R50 (Kinetics 8x8 architecture) returning pooled [B, 2304] features.

    head="adaptive": both pathways globally averaged (any input size; the default);
    head="finevq": `FineVQPool` (needs >= 8 slow / 32 fast frames and input side >= 224).
    The state_dict keys are the same for both heads.
    Initialisation draws from torch's global RNG; seed it (or fork it) around this call.
    """
    if head not in ("adaptive", "finevq"):
        raise InputError(f"unknown SlowFast head {head!r}; valid: adaptive, finevq")
    with warnings.catch_warnings():
        # fvcore (imported by pytorchvideo) calls the deprecated torch.jit.script at import time.
        warnings.simplefilter("ignore", FutureWarning)
        from pytorchvideo.models.hub import slowfast_r50

    model = slowfast_r50(pretrained=False)
    pool_concat, head_block = model.blocks[5], model.blocks[6]
    if head == "finevq":
        # pytorchvideo's own AvgPool3d((8,7,7)) / AvgPool3d((32,7,7)), as FineVQ takes them.
        model.blocks[5] = FineVQPool(list(pool_concat.pool))
    else:
        pool_concat.pool = nn.ModuleList(
            [nn.AdaptiveAvgPool3d(1) for _ in pool_concat.pool]
        )
    head_block.proj = nn.Identity()
    # dropout is inactive in eval(); activation is None; output_pool (adaptive avg to 1) then
    # view(B, -1) gives [B, 2304] (a no-op average after FineVQPool's [B, 2304, 1, 1, 1]).
    assert head_block.pool is None and head_block.activation is None, (
        "unexpected pytorchvideo head layout"
    )
    return model


def _read_state_dict(path: str) -> dict:
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # a truncated or foreign file
            raise InputError(
                f"cannot load SlowFast weights {path!r} as safetensors: {type(e).__name__}: {e}"
            ) from e
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


def _load_weights(model: nn.Module, path: str, state: dict | None = None) -> None:
    """Load the weights file `path` (or its already read `state`) into `model`, strictly."""
    state = {
        k: v
        for k, v in (_read_state_dict(path) if state is None else state).items()
        if not k.startswith(_IGNORED_PREFIX)
    }
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(
            f"SlowFast weights {path!r} do not fit SlowFast-R50: {e}"
        ) from e
    if missing or unexpected:
        hint = ""
        if any(k.startswith("slowfast_model.") for k in unexpected):
            hint = (
                " (FineVQ checkpoint keys: `fvq-rater convert SRC DST --recipe finevq` exports "
                "them as DST/temporal/slowfast_r50.safetensors)"
            )
        raise RuntimeError(
            f"SlowFast weights {path!r} do not match SlowFast-R50 (official SLOWFAST_8x8_R50 layout): "
            f"missing keys {sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
            + hint
        )


def _uint8_clip(clip) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1:
        raise ValueError(f"expected a uint8 clip [T, H, W, 3], got {clip.dtype} {clip.shape}")
    return clip


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

    clip = _uint8_clip(clip)
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


def finevq_frame_indices(n_frames: int) -> np.ndarray:
    """The frames FineVQ feeds SlowFast from an `n_frames`-frame video (int64).

    FineVQ's ``load_video2`` (internvl/train/inference.py) takes ``num_segments = len(vr)``
    segments, or 32 when the video is shorter, and picks them with ``get_index(bound=None)``:
    ``int(seg_size / 2 + np.round(seg_size * idx))`` with ``seg_size = (n_frames - 1) /
    num_segments``. For n_frames >= 32 that is every frame but the last, one frame near the
    middle taken twice; shorter videos repeat frames up to 32. (Assumes fps > 0: with fps 0
    FineVQ's ``end_idx`` would collapse to frame 0.)
    """
    return internvl_indices(int(n_frames), max(int(n_frames), FINEVQ_MIN_FRAMES))


def finevq_slow_indices(t: int, alpha: int = 4) -> torch.Tensor:
    """FineVQ's slow-pathway frames of a T-frame input: ``torch.linspace(0, T - 1, T // 4).long()``.

    As in FineVQ's ``pack_pathway_output``: float32 linspace on the CPU, truncated; the fast
    pathway keeps the first ``len(indices) * 4`` frames.
    """
    return torch.linspace(0, t - 1, t // alpha, dtype=torch.float32, device="cpu").long()


def preprocess_clip_finevq(clip: np.ndarray, size: int = FINEVQ_SIZE) -> torch.Tensor:
    """uint8 [T, H, W, 3] RGB (all frames of a video) -> float32 [3, T', size, size], FineVQ's way.

    T' = T for T >= 32, else 32 (frames picked by `finevq_frame_indices`); each frame is stretched
    (aspect ratio not kept, nothing cropped) to size x size with PIL's bicubic resize, scaled to
    [0, 1] and ImageNet-normalised: bit-identical to FineVQ's ``transform(dynamic_preprocess(...))``
    (ToTensor + Normalize). Frames already size x size are not resized (decode with
    ``video.all_frames(path, size=448)`` to keep memory low). Needs no model.
    """
    clip = _uint8_clip(clip)
    idx = finevq_frame_indices(clip.shape[0])
    unique, inverse = np.unique(idx, return_inverse=True)
    # FineVQ's later T.Resize((size, size), BICUBIC) returns a size x size image untouched.
    frames = np.stack([stretch(clip[i], (size, size)) for i in unique])[inverse]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()  # [3, T', S, S] uint8
    x = x.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return x.sub_(mean).div_(std)


class TemporalFeatures:
    """SlowFast-R50 clip features, [B, 2304] float32 (slow 2048 + fast 256).

    preprocess="kinetics" (default): a uniform `num_frames` clip, centre square, Kinetics norm,
    global average pooling. preprocess="finevq": FineVQ's convention (all frames, 448 stretch,
    ImageNet norm, linspace slow pathway, `FineVQPool`), for checkpoints converted from FineVQ;
    feed it every frame of each video (`video.all_frames`). Clips may differ in length there and
    run one at a time. `size` defaults to 224 (kinetics) / 448 (finevq); in finevq mode
    `num_frames` is FineVQ's fixed minimum of 32 and cannot be changed.
    """

    dim = 2304

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        size: int | None = None,
        num_frames: int | None = None,
        alpha: int = 4,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        preprocess: str = "kinetics",
    ):
        if preprocess not in TEMPORAL_PREPROCESSING:
            raise InputError(
                f"unknown temporal preprocess {preprocess!r}; valid: {', '.join(TEMPORAL_PREPROCESSING)}"
            )
        self.mode = preprocess
        if preprocess == "finevq":
            if num_frames not in (None, FINEVQ_MIN_FRAMES):
                raise InputError(
                    f"preprocess='finevq' uses every frame of the video (at least "
                    f"{FINEVQ_MIN_FRAMES}, as FineVQ): num_frames cannot be set (got {num_frames})"
                )
            if alpha != 4:
                raise InputError(f"preprocess='finevq' needs alpha=4 (FineVQ's), got {alpha}")
            size = FINEVQ_SIZE if size is None else size
            if size < 224:
                raise InputError(
                    f"preprocess='finevq' needs size >= 224 (its 7x7 pool; FineVQ uses "
                    f"{FINEVQ_SIZE}), got {size}"
                )
            if size != FINEVQ_SIZE:
                message = (
                    f"preprocess='finevq' with size={size}: FineVQ uses {FINEVQ_SIZE}, so these "
                    "are not FineVQ's motion features (leave size unset)"
                )
                warnings.warn(message, UserWarning, stacklevel=2)
                logger.warning(message)
        size = 224 if size is None else size
        num_frames = FINEVQ_MIN_FRAMES if num_frames is None else num_frames
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
        head = "finevq" if preprocess == "finevq" else "adaptive"

        if weights is not None:
            weights = os.fspath(weights)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"SlowFast weights file not found: {weights!r}")
            state = _read_state_dict(weights)  # a bad file fails before the model is built
            model = build_slowfast_r50(head)
            _load_weights(model, weights, state)
            del state
            self._weights_id = (
                f"{os.path.basename(weights)}@sha256:{file_digest(weights)[:16]}"
            )
        elif random_init:
            warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=2)
            logger.warning(RANDOM_WARNING)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_slowfast_r50(head)
            self._weights_id = f"random({seed})"
        else:
            raise InputError(
                "TemporalFeatures needs SlowFast weights: pass weights=PATH (the official "
                "SlowFast R50 Kinetics checkpoint SLOWFAST_8x8_R50.pyth, a state_dict of it, or a "
                ".safetensors file of one), or random_init=True (tests and demo only: features "
                "then carry no learned motion information)"
            )
        self.model = model.eval().to(device=torch.device(device), dtype=dtype)
        self.model.requires_grad_(False)

    def config(self) -> dict:
        """Everything that changes the output (a cache key)."""
        if self.mode == "finevq":
            return {
                "model": "slowfast_r50/finevq_pool",
                "weights": self._weights_id,
                "size": self.size,
                "num_frames": f"all(min {self.num_frames})",
                "alpha": self.alpha,
                "dtype": str(self.dtype).replace("torch.", ""),
                "preprocess": "finevq/get_index_all/stretch_pil_bicubic/imagenet_norm/linspace_slow",
            }
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
        """uint8 [T, H, W, 3] RGB -> float32 [3, T', size, size]: `preprocess_clip` (T' =
        num_frames) or, in finevq mode, `preprocess_clip_finevq` (T' = max(T, 32))."""
        if self.mode == "finevq":
            return preprocess_clip_finevq(clip, self.size)
        return preprocess_clip(clip, self.size, self.num_frames)

    @torch.no_grad()
    def __call__(
        self, clips: Sequence[np.ndarray | torch.Tensor] | torch.Tensor
    ) -> torch.Tensor:
        """Clips -> float32 [B, 2304] on CPU.

        `clips`: a list of uint8 [T, H, W, 3] clips and/or preprocessed float [3, T, S, S]
        tensors, or a preprocessed [B, 3, T, S, S] tensor. kinetics: T = num_frames, one batch.
        finevq: any T >= 32 for preprocessed input (list items may differ in length and run one
        at a time; a 5-D tensor runs as one batch).
        """
        if torch.is_tensor(clips):
            return self._forward(clips)
        clips = list(clips)
        if not clips:
            return torch.zeros(0, self.dim)

        def prepared(c):
            return c if torch.is_tensor(c) and c.is_floating_point() else self.preprocess(c)

        if self.mode == "kinetics":
            return self._forward(torch.stack([prepared(c) for c in clips]))
        # Lengths differ, and one long clip at 448 already fills memory: one clip at a time.
        return torch.cat([self._forward(prepared(c)[None]) for c in clips])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "finevq":
            ok = (
                x.ndim == 5
                and x.shape[1] == 3
                and x.shape[2] >= self.num_frames
                and tuple(x.shape[3:]) == (self.size, self.size)
            )
            expected = f"3, T >= {self.num_frames}, {self.size}, {self.size}"
        else:
            ok = x.ndim == 5 and tuple(x.shape[1:]) == (
                3, self.num_frames, self.size, self.size
            )
            expected = f"3, {self.num_frames}, {self.size}, {self.size}"
        if not ok:
            raise ValueError(f"expected clips [B, {expected}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return torch.zeros(0, self.dim)
        # The model's own device, so that moving the model (e.g. a pyiqa metric's .to()) is enough.
        fast = x.to(device=next(self.model.parameters()).device, dtype=self.dtype)
        if self.mode == "finevq":
            index = finevq_slow_indices(fast.shape[2], self.alpha)
            slow = torch.index_select(fast, 2, index.to(fast.device))
            fast = fast[:, :, : index.numel() * self.alpha]
        else:
            slow = fast[:, :, :: self.alpha]
        # The model rewrites its input list in place: always hand it a fresh one.
        out = self.model([slow, fast])
        return out.float().cpu()
