"""The feature pipeline: the four face-aware streams of one video, split by where they run.

`FramePreparer` does the per-video CPU work (decode, resize, face and portrait models, clip
preprocessing) and is picklable, so DataLoader workers run it ahead of the model.
`FeatureExtractor` adds the batched device work (SlowFast) and owns the whole configuration,
which keys the feature cache and is recorded in checkpoints.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch

from ..common import STREAMS
from ..errors import InputError
from ..video import all_frames, frame_indices, sample_and_dense, sample_frames
from .spatial import SpatialFeatures

# Part of every feature-cache key: bump it whenever preprocessing changes what a cached feature holds,
# so no run reuses features computed by older code.
FEATURES_VERSION = 3  # 3: info counts the faces per sampled frame
# The settings a user may override on a checkpoint's recorded ones (score/eval flags, pyiqa and
# lmms-eval options): which local models and decoder run, never what the recipe fixes.
FEATURE_OVERRIDES = ("video_backend", "face_backend", "face_models", "portrait_model", "temporal_weights")


@dataclass
class FeatureConfig:
    streams: tuple = STREAMS
    num_frames: int = 8
    frame_sampling: str = "internvl"      # recipe.FRAME_SAMPLINGS
    image_size: int = 448
    video_backend: str = "auto"
    face_backend: str = "yunet-sface"
    face_models: str | None = None        # insightface model directory (else env FVQ_FACE_MODELS)
    face_threshold: float = 0.6
    face_embedding: str = "l2"            # recipe.FACE_EMBEDDINGS
    portrait_model: str | None = None     # a .tflite selfie-segmentation model (else the shipped one)
    temporal_weights: str | None = None   # SlowFast-R50 checkpoint
    temporal_random: bool = False         # random SlowFast weights: tests and the demo only
    temporal_preprocess: str = "finevq"   # recipe.TEMPORAL_PREPROCESSING; "finevq" reads every frame at 448 px
    temporal_frames: int = 32             # "kinetics" only
    temporal_size: int = 224              # "kinetics" only

    def __post_init__(self):
        self.streams = tuple(s for s in STREAMS if s in self.streams)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown feature settings {unknown} (known: {sorted(known)})")
        return cls(**{k: (tuple(v) if k == "streams" else v) for k, v in data.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    def check_recipe(self, recipe, streams) -> None:
        """The settings a checkpoint's recipe fixes must be these; anything else would score another model."""
        wanted = {"num_frames": recipe.num_frames, "frame_sampling": recipe.frame_sampling}
        if "temporal" in streams:
            wanted["temporal_preprocess"] = recipe.temporal
        if "face" in streams:
            wanted["face_embedding"] = recipe.face_embedding
        wrong = [f"{name} is {getattr(self, name)!r} where the recipe says {value!r}"
                 for name, value in wanted.items() if getattr(self, name) != value]
        if wrong:
            raise InputError(f"the feature settings do not follow recipe {recipe.name!r}: " + "; ".join(wrong))


class FramePreparer:
    """Per-video work ahead of the model; returns uint8 frames and per-frame features, never model tensors.

    insightface runs on `device` (onnxruntime's CUDA provider); YuNet/SFace (OpenCV) and the portrait
    model (TFLite) have CPU runtimes only.
    """

    def __init__(self, config: FeatureConfig, device="cpu"):
        self.config = config
        self.spatial = SpatialFeatures(config.image_size)
        self.portrait = self.face = None
        if "portrait" in config.streams:
            from .portrait import PortraitFeatures

            self.portrait = PortraitFeatures(model_path=config.portrait_model)
        if "face" in config.streams:
            from .face import FaceFeatures

            self.face = FaceFeatures(backend=config.face_backend, model_dir=config.face_models,
                                     det_threshold=config.face_threshold, embedding=config.face_embedding,
                                     device=str(device) if config.face_backend == "insightface" else "cpu")
        if "temporal" in config.streams:
            from .temporal import preprocess_clip

            # FineVQ's clip is every frame: it stays uint8 until SlowFast's own preprocessing in finish().
            self.clip_preprocess = (torch.from_numpy if config.temporal_preprocess == "finevq" else
                                    partial(preprocess_clip, size=config.temporal_size, num_frames=config.temporal_frames))

    def __call__(self, path) -> dict:
        """Features of one video file (raises VideoReadError for unreadable files)."""
        config = self.config
        dense = None
        if "temporal" in config.streams and config.temporal_preprocess == "finevq":
            from .temporal import FINEVQ_SIZE

            # Two passes: the sampled frames at full resolution (faces, portraits), every frame at 448.
            clip = sample_frames(path, config.num_frames, config.video_backend, config.frame_sampling)
            dense = all_frames(path, config.video_backend, size=FINEVQ_SIZE).frames
        elif "temporal" in config.streams:
            # One decoding pass serves the sampled frames and SlowFast's dense clip.
            clip, dense_frames = sample_and_dense(path, config.num_frames, config.temporal_frames,
                                                  config.temporal_size, config.video_backend,
                                                  sampling=config.frame_sampling)
            dense = dense_frames.frames
        else:
            clip = sample_frames(path, config.num_frames, config.video_backend, config.frame_sampling)
        info = clip.info
        return self._features(clip.frames, dense, {"n_frames": info.n_frames, "fps": info.fps, "width": info.width,
                                                   "height": info.height, "backend": info.backend,
                                                   "repeated": clip.repeated})

    def from_frames(self, frames: np.ndarray) -> dict:
        """Features of in-memory frames uint8 [T,H,W,3] of one video (an image is T=1)."""
        indices = frame_indices(len(frames), self.config.num_frames, self.config.frame_sampling)
        height, width = frames.shape[1:3]
        return self._features(frames[indices], frames, {"n_frames": len(frames), "fps": 0.0, "width": width,
                                                         "height": height, "backend": "frames",
                                                         "repeated": len(frames) < self.config.num_frames})

    def _features(self, sampled: np.ndarray, dense: np.ndarray | None, info: dict) -> dict:
        out = {"info": info}
        if "spatial" in self.config.streams:
            out["frames"] = self.spatial.resize(sampled)
        if self.portrait is not None:
            portraits, person = self.portrait(sampled)
            out["portraits"] = self.spatial.resize(portraits)
            out["person_mask"] = torch.from_numpy(person)
        if self.face is not None:
            faces = self.face(sampled)
            out["face_embeds"] = torch.from_numpy(faces.embeds)
            out["face_mask"] = torch.from_numpy(faces.mask)
            info.update(face_frames=int(faces.mask.sum()), most_faces=int(faces.counts.max()))
        if dense is not None:
            out["temporal_clip"] = self.clip_preprocess(dense)
        return out

    def key(self) -> dict:
        """Everything that changes the output, per stream."""
        key = {"num_frames": self.config.num_frames, "frame_sampling": self.config.frame_sampling,
               "video_backend": self.config.video_backend,
               "spatial": self.spatial.config()}
        if self.portrait is not None:
            key["portrait"] = self.portrait.config()
        if self.face is not None:
            key["face"] = self.face.config()
        return key


class FeatureExtractor:
    """All streams: CPU preparation plus SlowFast on `device`, batched over videos."""

    def __init__(self, config: FeatureConfig, device="cpu"):
        self.config, self.device = config, torch.device(device)
        self.preparer = FramePreparer(config, self.device)
        self.temporal = None
        if "temporal" in config.streams:
            from .temporal import TemporalFeatures

            kinetics = config.temporal_preprocess == "kinetics"
            self.temporal = TemporalFeatures(weights=config.temporal_weights, random_init=config.temporal_random,
                                             device=self.device, preprocess=config.temporal_preprocess,
                                             size=config.temporal_size if kinetics else None,
                                             num_frames=config.temporal_frames if kinetics else None)

    @property
    def face_dim(self) -> int | None:
        return self.preparer.face.dim if self.preparer.face is not None else None

    def key(self) -> dict:
        from .. import __version__

        key = self.preparer.key()
        if self.temporal is not None:
            key["temporal"] = self.temporal.config()
        key["code"] = {"fvq_plugin": __version__, "features": FEATURES_VERSION}
        return key

    def key_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def finish(self, prepared: list[dict]) -> list[dict]:
        """Replace each prepared clip by its SlowFast feature, in one batched forward."""
        if self.temporal is not None and prepared:
            clips = [p.pop("temporal_clip") for p in prepared]
            for item, feature in zip(prepared, self.temporal(clips)):
                item["temporal"] = feature
        return prepared


def model_inputs(features: list[dict], spatial: SpatialFeatures, device="cpu", dtype=torch.float32) -> dict:
    """Stack per-video features into the keyword arguments of FVQRater.forward."""
    def stack(name):
        return torch.stack([torch.as_tensor(f[name]) for f in features]).to(device)

    batch = {}
    first = features[0]
    if "frames" in first:
        batch["pixel_values"] = spatial.normalize(stack("frames")).to(dtype)
    if "portraits" in first:
        batch["portrait_values"] = spatial.normalize(stack("portraits")).to(dtype)
    if "face_embeds" in first:
        batch["face_embeds"] = stack("face_embeds").float()
        batch["face_mask"] = stack("face_mask").bool()
    if "temporal" in first:
        batch["temporal"] = stack("temporal").float()
    return batch
