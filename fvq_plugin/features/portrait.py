"""Portrait stream: each sampled frame with the background replaced by a constant colour.

The person matte comes from a TFLite person-segmentation model run with LiteRT
(`ai-edge-litert`; `tflite-runtime` does not load under numpy 2). The default is MediaPipe's
selfie segmentation model, vendored unmodified in `models/` (see `models/NOTICE.md`).
Any other `.tflite` file with the same contract can be passed as `model_path`:
input float32 [1, H, W, 3] RGB in [0, 1] (the frame stretched to H x W),
output float32 [1, H, W, 1] person probability.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from ..common import file_digest
from ..errors import InputError
from ..quiet import native_stderr_filtered

from .spatial import IMAGENET_MEAN

DEFAULT_MODEL = Path(__file__).with_name("models") / "selfie_segmentation.tflite"

# The ImageNet mean colour, (124, 116, 104): after the spatial stream's mean/std normalisation
# the background is ~0, so it carries no signal into the ViT.
BACKGROUND = tuple(round(m * 255) for m in IMAGENET_MEAN)


class PortraitFeatures:
    """Frames uint8 [N,H,W,3] RGB -> (portraits uint8 [N,H,W,3], person bool [N])."""

    def __init__(self, model_path=None, threshold=0.5, min_person_fraction=0.01, num_threads=1):
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        if not self.model_path.is_file():
            raise FileNotFoundError(f"portrait segmentation model not found: {self.model_path}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if not 0.0 <= min_person_fraction <= 1.0:
            raise ValueError(f"min_person_fraction must be in [0, 1], got {min_person_fraction}")
        self.threshold = float(threshold)
        self.min_person_fraction = float(min_person_fraction)
        self.num_threads = int(num_threads)
        self._sha256 = file_digest(self.model_path)
        # Built now so a model with the wrong I/O contract fails at construction, not mid-epoch.
        self._interpreter = None
        self._load()

    def config(self) -> dict:
        """Everything that changes the output: a cache key, recorded in checkpoints."""
        return {
            "model": self.model_path.name,
            "model_sha256": self._sha256[:16],
            "threshold": self.threshold,
            "min_person_fraction": self.min_person_fraction,
            "background": list(BACKGROUND),
        }

    def matte(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] RGB -> float32 person alpha [N,H,W] in [0,1] at the frame size."""
        frames = _check_frames(frames)
        interpreter = self._load()
        n, h, w, _ = frames.shape
        alpha = np.empty((n, h, w), np.float32)
        for i, frame in enumerate(frames):  # the model has a fixed batch of 1
            # INTER_AREA: anti-aliased when shrinking video frames to the model's size.
            x = cv2.resize(frame, (self._in_w, self._in_h), interpolation=cv2.INTER_AREA)
            interpreter.set_tensor(self._in_index, (x.astype(np.float32) / 255.0)[None])
            interpreter.invoke()
            prob = interpreter.get_tensor(self._out_index)[0, :, :, 0]
            alpha[i] = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        # A user model's (e.g. float16) output may stray slightly outside the probability range.
        return np.clip(alpha, 0.0, 1.0, out=alpha)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = _check_frames(frames)
        alpha = self.matte(frames)
        person = (alpha > self.threshold).mean(axis=(1, 2)) >= self.min_person_fraction
        background = np.full(frames.shape[1:], BACKGROUND, np.uint8)
        # Frames without a person stay unmasked rather than becoming a blank background.
        portraits = frames.copy()
        for i in np.flatnonzero(person):
            # frame * alpha + background * (1 - alpha); ~4x faster than the numpy expression.
            portraits[i] = cv2.blendLinear(frames[i], background, alpha[i], 1.0 - alpha[i])
        return portraits, person

    def _load(self) -> Interpreter:
        if self._interpreter is None:
            with native_stderr_filtered():  # LiteRT announces its XNNPACK delegate on every load
                interpreter = Interpreter(model_path=str(self.model_path), num_threads=self.num_threads)
                interpreter.allocate_tensors()
            (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
            shape = [int(d) for d in inp["shape"]]
            if (inp["dtype"] != np.float32 or len(shape) != 4 or shape[0] != 1 or shape[3] != 3
                    or [int(d) for d in out["shape"]] != [1, *shape[1:3], 1]):
                raise InputError(
                    f"{self.model_path}: expected input float32 [1,H,W,3] and output [1,H,W,1], "
                    f"got input {inp['dtype'].__name__} {shape} and output {list(out['shape'])}")
            self._in_index, self._out_index = inp["index"], out["index"]
            self._in_h, self._in_w = shape[1], shape[2]
            self._interpreter = interpreter
        return self._interpreter

    def __getstate__(self):
        # The LiteRT interpreter is a native object that cannot be pickled; each DataLoader
        # worker rebuilds its own on first use.
        state = self.__dict__.copy()
        state["_interpreter"] = None
        return state


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected uint8 frames [N,H,W,3], got {frames.dtype} {frames.shape}")
    # OpenCV rejects views with negative or gapped strides, e.g. a BGR->RGB `[..., ::-1]`.
    return np.ascontiguousarray(frames)
