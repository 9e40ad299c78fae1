"""fvq_rater_lite: a small CNN student of FVQ-Rater, for screening many videos cheaply.

The student reads the clip's first 6 frames at 80 px and the face in each (YuNet, OpenCV, found
once) at 48 px; two small strided CNNs pool each image to its channel means and deviations
(texture statistics carry blur, noise and blocking), the frame vectors are pooled over time (mean,
deviation, mean absolute change) with pixel-change statistics of consecutive frames (stutter,
shake, noise), and an MLP maps all of it to 0-100. No LMM, SlowFast, matting or identity model is
loaded: opening and decoding the clip is most of its cost. `fvq-rater distill` trains it (see
distill.py); the checkpoint is a folder with `fvq_rater_lite.json` and `model.safetensors`, and
`fvq-rater export-onnx` writes it as ONNX.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from .common import LEVELS, video_flags, write_atomically
from .errors import InputError
from .scoring import Scorer
from .video import frame_indices, sample_frames

LITE_CONFIG_FILE = "fvq_rater_lite.json"
LITE_WEIGHTS_FILE = "model.safetensors"
LITE_FORMAT = 1
INPUT_NAMES = ("frames", "faces", "face_mask")  # LiteRater.forward's, in order (and the ONNX graph's)
FACE_MARGIN = 1.3  # the face crop is this many times the detector's box, square


class LiteCheckpointError(InputError):
    """A folder that is not a readable fvq_rater_lite checkpoint."""


@dataclass(frozen=True)
class LiteConfig:
    num_frames: int = 6
    frame_size: int = 80
    face_size: int = 48
    # video.SAMPLERS. The clip's first frames ("leading") decode in a fraction of the time that frames spread over
    # the clip ("centres") take, which need nearly all of it decoded; and six of them, with the face detected
    # once, score the demo as well as four spread ones (README, "Distilled student").
    frame_sampling: str = "leading"
    frame_widths: tuple = (16, 32, 64, 96)
    face_widths: tuple = (16, 32, 64)
    hidden: int = 128
    video_backend: str = "auto"
    face_threshold: float = 0.6
    detect_side: int = 320  # frames are shrunk to this longer side for face detection: the subject's face is large

    @classmethod
    def from_dict(cls, data: dict) -> "LiteConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LiteCheckpointError(f"unknown fvq_rater_lite settings {unknown} (known: {sorted(known)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    def input_key(self) -> dict:
        """The settings that change the prepared inputs (the cache key): not the network's widths."""
        return {name: getattr(self, name) for name in ("num_frames", "frame_size", "face_size", "frame_sampling",
                                                       "video_backend", "face_threshold", "detect_side")}


# What `distill --student-sampling` chooses between. Frames spread over the clip keep the size and count they
# were measured best at: at 80 px six of them scored the demo far worse (README, "Distilled student").
SAMPLING_PRESETS = {"leading": LiteConfig(),
                    "centres": LiteConfig(num_frames=4, frame_size=112, frame_sampling="centres")}


# --- inputs ----------------------------------------------------------------------------------------

def _face_crop(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """A square crop FACE_MARGIN times the box around its centre, zero-padded at the frame's edges."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * FACE_MARGIN
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # An affine warp crops, pads and resizes in one pass.
    scale = size / max(side, 1.0)
    matrix = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]], np.float32)
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT)


class LitePreparer:
    """Path or frames -> the student's inputs (uint8 frames and face crops, a face mask) and `info`.

    Picklable: DataLoader workers run it, each loading its own YuNet.
    """

    def __init__(self, config: LiteConfig):
        from .features.face import YuNetDetector

        self.config = config
        self.detector = YuNetDetector(config.face_threshold, max_side=config.detect_side)

    def __call__(self, path) -> dict:
        clip = sample_frames(path, self.config.num_frames, self.config.video_backend, self.config.frame_sampling)
        info = clip.info
        return self._inputs(clip.frames, {"n_frames": info.n_frames, "fps": info.fps, "width": info.width,
                                          "height": info.height, "backend": info.backend, "repeated": clip.repeated})

    def from_frames(self, frames: np.ndarray) -> dict:
        """Inputs of in-memory frames uint8 [T,H,W,3] of one video (an image is T=1)."""
        indices = frame_indices(len(frames), self.config.num_frames, self.config.frame_sampling)
        height, width = frames.shape[1:3]
        return self._inputs(frames[indices], {"n_frames": len(frames), "fps": 0.0, "width": width, "height": height,
                                              "backend": "frames", "repeated": len(frames) < self.config.num_frames})

    def _inputs(self, sampled: np.ndarray, info: dict) -> dict:
        config = self.config
        size, face_size = config.frame_size, config.face_size
        frames = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in sampled])
        faces = np.zeros((len(sampled), face_size, face_size, 3), np.uint8)
        mask = np.zeros(len(sampled), bool)
        boxes, counts = self._face_boxes(sampled)
        for i, (frame, box) in enumerate(zip(sampled, boxes)):
            if box is not None:
                faces[i] = _face_crop(frame, box, face_size)
                mask[i] = True
        info.update(face_frames=int(mask.sum()), most_faces=max(counts))
        return {"frames": torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
                "faces": torch.from_numpy(faces).permute(0, 3, 1, 2).contiguous(),
                "face_mask": torch.from_numpy(mask), "info": info}

    def _face_boxes(self, sampled: np.ndarray) -> tuple[list, list[int]]:
        """The box that crops each frame's face (None: no face), and the face counts of the frames searched."""
        from .features.face import pick_face

        counts = []

        def search(frame):
            boxes, _, _ = self.detector.detect(frame)
            counts.append(len(boxes))
            return boxes[pick_face(boxes, *frame.shape[:2])] if len(boxes) else None

        if self.config.frame_sampling != "leading":
            return [search(frame) for frame in sampled], counts
        # The clip's first frames are consecutive (a quarter second), so the face barely moves between them: the box
        # of the first frame that shows one crops the later frames too. When neither the first frame nor the last
        # shows a face, none is looked for in between: 2 searches, not one per frame, for a clip without a face.
        first, box = 0, search(sampled[0])
        last = len(sampled) - 1
        if box is None and last > 0:
            box = search(sampled[last])
            if box is not None:  # the face came into view: from the first frame that shows it
                first = last
                for i in range(1, last):
                    found = search(sampled[i])
                    if found is not None:
                        first, box = i, found
                        break
        return [None] * first + [box] * (len(sampled) - first), counts


class LiteExtractor:
    """The student's side of `scoring.extract_features`: its preparer, cache key and (no) batched device work."""

    def __init__(self, config: LiteConfig):
        self.config = config
        self.preparer = LitePreparer(config)

    def finish(self, prepared: list[dict]) -> list[dict]:
        return prepared

    def key_digest(self) -> str:
        from . import __version__

        key = {"lite_inputs": self.config.input_key(), "detector": self.detector_record(), "fvq_plugin": __version__}
        return "lite-" + hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()

    def detector_record(self) -> dict:
        from .features.face import _file_record

        return _file_record(Path(self.preparer.detector.model_file))


def stack_inputs(prepared: list[dict]) -> dict:
    """Prepared inputs of several videos, stacked as they are (uint8 images, bool masks)."""
    return {name: torch.stack([p[name] for p in prepared]) for name in INPUT_NAMES}


def float_inputs(stacked: dict, device="cpu") -> dict:
    """Stacked inputs -> LiteRater.forward's keyword arguments (floats in [0, 1])."""
    return {"frames": stacked["frames"].to(device).float() / 255, "faces": stacked["faces"].to(device).float() / 255,
            "face_mask": stacked["face_mask"].to(device).float()}


def batch_inputs(prepared: list[dict], device="cpu") -> dict:
    """Prepared inputs of several videos -> LiteRater.forward's keyword arguments."""
    return float_inputs(stack_inputs(prepared), device)


# --- the network -----------------------------------------------------------------------------------

def _tower(widths) -> nn.Sequential:
    layers, channels = [], 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers)


def _mean_and_deviation(x: torch.Tensor, dims) -> torch.Tensor:
    # Written out rather than torch.std, so the ONNX graph is plain arithmetic.
    mean = x.mean(dims)
    deviation = ((x * x).mean(dims) - mean * mean).clamp_min(0).add(1e-6).sqrt()
    return torch.cat([mean, deviation], -1)


class LiteRater(nn.Module):
    def __init__(self, config: LiteConfig | None = None):
        super().__init__()
        self.config = config = config or LiteConfig()
        self.frame_tower, self.face_tower = _tower(config.frame_widths), _tower(config.face_widths)
        frame_dim, face_dim = 2 * config.frame_widths[-1], 2 * config.face_widths[-1]
        # frames pooled over time (mean, deviation, mean change), the faces' mean, face fraction, 3 pixel-change stats
        inputs = 3 * frame_dim + face_dim + 1 + 3
        self.head = nn.Sequential(nn.Linear(inputs, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, frames: torch.Tensor, faces: torch.Tensor, face_mask: torch.Tensor) -> torch.Tensor:
        """frames [B,T,3,S,S] and faces [B,T,3,F,F] in [0, 1], face_mask [B,T] (1: a face) -> scores [B] in 0-100."""
        batch, steps = frames.shape[:2]
        per_frame = _mean_and_deviation(self._tower(self.frame_tower, frames), (2, 3)).view(batch, steps, -1)
        per_face = _mean_and_deviation(self._tower(self.face_tower, faces), (2, 3)).view(batch, steps, -1)
        change = (per_frame[:, 1:] - per_frame[:, :-1]).abs().mean(1) if steps > 1 else torch.zeros_like(per_frame[:, 0])
        weights = face_mask.unsqueeze(-1)
        found = weights.sum(1)
        face = (per_face * weights).sum(1) / found.clamp_min(1.0)
        pixels = ((frames[:, 1:] - frames[:, :-1]).abs().mean((2, 3, 4)) if steps > 1
                  else torch.zeros(batch, 1, dtype=frames.dtype, device=frames.device))
        motion = torch.stack([pixels.mean(1), pixels.min(1).values, pixels.max(1).values], -1)
        pooled = torch.cat([_mean_and_deviation(per_frame, (1,)), change, face, found / steps, motion], -1)
        return 100 * torch.sigmoid(self.head(pooled).squeeze(-1))

    def _tower(self, tower: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(0, 1)
        return tower((flat - self.pixel_mean) / self.pixel_std)


# --- checkpoints -----------------------------------------------------------------------------------

def is_student(directory) -> bool:
    return (Path(directory) / LITE_CONFIG_FILE).is_file()


def student_path(given, option: str) -> str:
    """The student folder given through `option`, else from FVQ_RATER_LITE_WEIGHTS; checked before anything loads."""
    import os

    from .common import LITE_WEIGHTS_ENV

    path = given or os.environ.get(LITE_WEIGHTS_ENV)
    if not path:
        raise LiteCheckpointError(f"no fvq_rater_lite weights: pass {option} or set {LITE_WEIGHTS_ENV}=DIR "
                                  "(`fvq-rater distill --out DIR` trains one into DIR/student)")
    if not is_student(path):
        where = "" if given else f"{LITE_WEIGHTS_ENV} (from the environment): "
        raise LiteCheckpointError(f"{where}{path} is not an fvq_rater_lite checkpoint ({LITE_CONFIG_FILE} not found); "
                                  "`fvq-rater distill --out DIR` writes one in DIR/student")
    return str(path)


def save_student(model: LiteRater, directory, trained: dict | None = None) -> Path:
    """The student's config, how it was trained (free-form), and its weights; written weights first."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, directory / LITE_WEIGHTS_FILE)
    write_atomically(directory / LITE_CONFIG_FILE, json.dumps({"format": LITE_FORMAT, "config": model.config.to_dict(),
                                                               "trained": trained or {}}, indent=2))
    return directory


def load_student(directory, device="cpu") -> LiteRater:
    from safetensors.torch import load_file

    directory = Path(student_path(directory, "a checkpoint folder"))
    try:
        saved = json.loads((directory / LITE_CONFIG_FILE).read_text())
        if saved.get("format") != LITE_FORMAT:
            raise LiteCheckpointError(f"{directory}: fvq_rater_lite format {saved.get('format')!r}, this version reads "
                                      f"{LITE_FORMAT}")
        model = LiteRater(LiteConfig.from_dict(saved["config"]))
        model.load_state_dict(load_file(directory / LITE_WEIGHTS_FILE))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise LiteCheckpointError(f"{directory}: unreadable fvq_rater_lite checkpoint: {error}") from None
    return model.to(device).eval()


def for_inference(model: LiteRater) -> LiteRater:
    """A copy that scores as `model` does, faster on CPU: each convolution absorbs the batch norm after it
    (one pass over the activations instead of two), the ReLUs work in place (a fresh buffer of a few MB
    costs its page faults on every batch) and the weights are laid out channels-last, the layout oneDNN's
    convolutions run best in."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for name in ("frame_tower", "face_tower"):
        merged = []
        for layer in getattr(fused, name):
            if isinstance(layer, nn.BatchNorm2d):
                merged[-1] = fuse_conv_bn_eval(merged[-1], layer)
            else:
                merged.append(nn.ReLU(inplace=True) if isinstance(layer, nn.ReLU) else layer)
        setattr(fused, name, nn.Sequential(*merged))
    return fused.to(memory_format=torch.channels_last)


def export_onnx(model: LiteRater, path, batch: int = 2) -> Path:
    """The network as ONNX (batch size free; frames, face size and frame count fixed by the config)."""
    import warnings

    config = model.config
    example = batch_inputs([_blank_inputs(config)] * batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript exporter: the dynamo one needs onnxscript, and this graph is plain convolutions.
        torch.onnx.export(model.cpu().eval(), tuple(example[name] for name in INPUT_NAMES), str(path), dynamo=False,
                          input_names=list(INPUT_NAMES), output_names=["score"],
                          dynamic_axes={**{name: {0: "batch"} for name in INPUT_NAMES}, "score": {0: "batch"}})
    return path


def onnx_session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_onnx(model: LiteRater, path, batch: int = 3, seed: int = 0) -> float:
    """The largest difference between onnxruntime's and torch's scores of the same random inputs."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    t, s, f = config.num_frames, config.frame_size, config.face_size
    inputs = {"frames": torch.rand(batch, t, 3, s, s, generator=generator),
              "faces": torch.rand(batch, t, 3, f, f, generator=generator),
              "face_mask": (torch.rand(batch, t, generator=generator) < 0.7).float()}
    with torch.no_grad():
        expected = model.cpu().eval()(**inputs).numpy()
    (scores,) = onnx_session(path).run(["score"], {name: value.numpy() for name, value in inputs.items()})
    return float(np.abs(scores - expected).max())


def _blank_inputs(config: LiteConfig) -> dict:
    t, s, f = config.num_frames, config.frame_size, config.face_size
    return {"frames": torch.zeros(t, 3, s, s, dtype=torch.uint8), "faces": torch.zeros(t, 3, f, f, dtype=torch.uint8),
            "face_mask": torch.zeros(t, dtype=torch.bool)}


# --- scoring ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _one_torch_thread():
    """torch on one core for a while (a setting of the whole process). While threads prepare the next videos,
    a network this small scores faster on one core than spread over the cores they keep busy (3-7% in two runs
    on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LiteScorer(Scorer):
    """The Scorer (batches, workers, results file, resume, failures) with the student in place of FVQ-Rater."""

    def _check_compatible(self):
        pass  # the student's inputs are made from its own config

    @classmethod
    def from_pretrained(cls, checkpoint, device="cpu", **options) -> "LiteScorer":
        model = load_student(checkpoint, device)
        return cls(for_inference(model), LiteExtractor(model.config), **options)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_features(self, features: list[dict]) -> list[dict]:
        with _one_torch_thread() if self.threads else contextlib.nullcontext():
            scores = self.model(**batch_inputs(features, self.device)).float().tolist()
        return [{"score": score, "level": LEVELS[min(int(score // 20), len(LEVELS) - 1)],
                 "flags": video_flags(f["info"]), "info": f["info"]} for score, f in zip(scores, features)]

    @functools.cached_property
    def fingerprint(self) -> str:
        from safetensors.torch import save

        from . import __version__

        weights = hashlib.blake2b(save({k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}),
                                  digest_size=16).hexdigest()
        described = {"lite": self.model.config.to_dict(), "weights": weights, "inputs": self.extractor.key_digest(),
                     "fvq_plugin": __version__}
        return hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=16).hexdigest()
