r"""FVQ-Rater as the pyiqa metric `fvq_rater`, and its distilled student as `fvq_rater_lite`.

Paper:
    FVQ-20K / FVQ-Rater: "Face Video Quality assessment" (arXiv 2504.09255, ACM MM 2025).
    FVQ-Rater rates a face video from 0 (bad) to 100 (excellent) with an InternVL LMM that reads
    spatial frames, person-matted portrait frames, face identity embeddings and SlowFast motion.

Re-implemented by the fvq-plugin authors (the paper's authors released weights, not code).

Inputs (the metric is no-reference, higher is better):
    a video path (or pathlib.Path), or a list of them     -> one score each, batched
    an image path                                         -> a one-frame video
    a float tensor [T,3,H,W] in [0,1]                     -> the T frames of ONE video
    a float tensor [B,T,3,H,W] in [0,1]                   -> B videos

Weights: an FVQ-Rater checkpoint folder, from `pretrained_model_path=` or env FVQ_RATER_WEIGHTS.
The released weights (HF `Human-X/FVQ-Rater`) must first be converted with `fvq-rater convert`;
nothing is downloaded. `fvq_rater_lite` takes the same inputs; its weights are a student folder
written by `fvq-rater distill` (`pretrained_model_path=` or env FVQ_RATER_LITE_WEIGHTS).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .pyiqa_inputs import VideoPaths, install

METRIC_NAME, LITE_METRIC_NAME = "fvq_rater", "fvq_rater_lite"
DEFAULT_CONFIG = {
    "metric_opts": {"type": "FVQRaterArch"},
    "metric_mode": "NR",
    "lower_better": False,
    "score_range": "0, 100",
}
LITE_DEFAULT_CONFIG = {**DEFAULT_CONFIG, "metric_opts": {"type": "FVQRaterLiteArch"}}
# No URL: the released checkpoint needs `fvq-rater convert` before it loads here.
default_model_urls: dict[str, str] = {}


class FVQRaterArch(nn.Module):
    """FVQ-Rater network for pyiqa.

    Args:
        pretrained (bool): must stay True; FVQ-Rater has no meaningful random-weight mode.
        pretrained_model_path (str): FVQ-Rater checkpoint folder (default: env FVQ_RATER_WEIGHTS).
        batch_size (int): videos per forward when a list of paths is given.
        dtype: backbone dtype (default: bfloat16 on a GPU, the checkpoint's on the CPU).
        device_map, attn_implementation: backbone loading options for large checkpoints; with a
            device_map the backbone stays where it was dispatched.
        merge_lora (bool): fold LoRA into the base weights (default True).
        video_backend, face_backend, face_models, portrait_model, temporal_weights: feature settings
            overriding those recorded in the checkpoint.

    The checkpoint is checked here but loaded on the first `.to(device)` (which pyiqa's
    create_metric calls right away) straight onto that device, never built on the CPU first.
    """

    name = METRIC_NAME

    def __init__(self, pretrained: bool = True, pretrained_model_path: str | None = None, batch_size: int = 8,
                 dtype=None, device_map=None, attn_implementation=None, merge_lora: bool = True, **feature_settings):
        super().__init__()
        from ..checkpoint import checkpoint_path, parse_dtype
        from ..features.pipeline import FEATURE_OVERRIDES

        if not pretrained:
            raise ValueError("fvq_rater has no random-weight mode: it needs FVQ-Rater weights")
        unknown = sorted(set(feature_settings) - set(FEATURE_OVERRIDES))
        if unknown:
            raise TypeError(f"fvq_rater: unknown options {unknown}; feature settings are {', '.join(FEATURE_OVERRIDES)}")
        self.path = checkpoint_path(pretrained_model_path, "pretrained_model_path=DIR to pyiqa.create_metric")
        self.options = {"dtype": parse_dtype(dtype), "device_map": device_map, "attn_implementation": attn_implementation,
                        "merge_lora": merge_lora, "feature_overrides": feature_settings, "batch_size": batch_size}
        self.scorer = None

    def to(self, *args, **kwargs):
        if self.scorer is None:
            self._load(torch._C._nn._parse_to(*args, **kwargs)[0] or torch.device("cpu"))
        return super().to(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """Every move (.to, .cuda, a parent module's .to) comes here: a dispatched backbone stays put."""
        if self.scorer is None:
            self._load(torch.device("cpu"))
        return self if self.options["device_map"] is not None else super()._apply(fn, recurse)

    def _load(self, device: torch.device) -> None:
        from ..scoring import Scorer

        options = dict(self.options)
        if options["dtype"] is None and device.type == "cuda":
            options["dtype"] = torch.bfloat16
        self.scorer = Scorer.from_pretrained(self.path, device=device, **options)
        # Submodules, so pyiqa's .to(device) moves the rater and SlowFast together.
        self.rater = self.scorer.model
        temporal = self.scorer.extractor.temporal
        self.slowfast = temporal.model if temporal is not None else None

    def prepare_inputs(self, target):
        """Called by pyiqa's InferenceModel (see pyiqa_inputs) with the user's raw input."""
        if isinstance(target, (str, os.PathLike)):
            return VideoPaths([os.fspath(target)])
        if isinstance(target, (list, tuple)) and target and all(isinstance(t, (str, os.PathLike)) for t in target):
            return VideoPaths(os.fspath(t) for t in target)
        if torch.is_tensor(target):
            if target.dim() == 4:
                target = target.unsqueeze(0)
            if target.dim() != 5 or target.shape[2] != 3:
                raise ValueError(f"{self.name} takes frames [T,3,H,W] or videos [B,T,3,H,W], got {tuple(target.shape)}")
            if target.min() < 0 or target.max() > 1:
                raise ValueError(f"{self.name} takes frames in [0, 1]")
            return target
        raise TypeError(f"{self.name} takes a path, a list of paths or a frame tensor, got {type(target).__name__}")

    def forward(self, videos) -> torch.Tensor:
        """One score per video. A video that cannot be read raises, naming every such file and why (a
        metric returns scores only); a scored video's flags (no face, repeated frames, ...) are warnings."""
        from ..video import VideoReadError

        if self.scorer is None:
            self._load(torch.device("cpu"))
        device = self.scorer.device
        if isinstance(videos, VideoPaths):
            results = self.scorer.score(videos, progress=False)
            failed = [r for r in results if "error" in r]
            if len(failed) == 1:
                raise VideoReadError(failed[0]["path"], failed[0]["error"])
            if failed:
                reasons = "; ".join(f"{r['path']}: {r['error']}" for r in failed)
                raise VideoReadError(f"{len(failed)} of {len(results)} videos", reasons)
        else:
            results = self.scorer.score_frames([_uint8_frames(video) for video in videos])
        for index, result in enumerate(results):
            if result["flags"]:
                what = result.get("path", f"video {index} of the batch")
                warnings.warn(f"{self.name}: {what}: scored with flags {', '.join(result['flags'])}", stacklevel=2)
        return torch.tensor([r["score"] for r in results], device=device)


def _uint8_frames(frames: torch.Tensor):
    """float [T,3,H,W] in [0,1] -> uint8 [T,H,W,3] numpy, as decoded video frames are."""
    return (frames.detach().float() * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class FVQRaterLiteArch(FVQRaterArch):
    """fvq_rater_lite (see fvq_plugin.lite): FVQ-Rater's distilled student, same inputs and score scale.

    Args:
        pretrained (bool): must stay True.
        pretrained_model_path (str): student folder (default: env FVQ_RATER_LITE_WEIGHTS).
        batch_size (int): videos per forward when a list of paths is given.
    """

    name = LITE_METRIC_NAME

    def __init__(self, pretrained: bool = True, pretrained_model_path: str | None = None, batch_size: int = 8):
        nn.Module.__init__(self)
        from ..lite import student_path

        if not pretrained:
            raise ValueError("fvq_rater_lite has no random-weight mode: it needs a distilled student")
        self.path = student_path(pretrained_model_path, "pretrained_model_path=DIR to pyiqa.create_metric")
        self.options = {"batch_size": batch_size, "device_map": None}
        self.scorer = None

    def _load(self, device: torch.device) -> None:
        from ..lite import LiteScorer

        self.scorer = LiteScorer.from_pretrained(self.path, device=device, batch_size=self.options["batch_size"])
        self.rater = self.scorer.model


def register() -> None:
    """Make `pyiqa.create_metric('fvq_rater')` (and 'fvq_rater_lite') and `pyiqa.list_models()` know them."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.registry import ARCH_REGISTRY

    DEFAULT_CONFIGS.setdefault(METRIC_NAME, DEFAULT_CONFIG)
    DEFAULT_CONFIGS.setdefault(LITE_METRIC_NAME, LITE_DEFAULT_CONFIG)
    ARCH_REGISTRY.register(FVQRaterArch, override=True)
    ARCH_REGISTRY.register(FVQRaterLiteArch, override=True)
    install()
