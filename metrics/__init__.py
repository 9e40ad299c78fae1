"""Agreement between predicted scores and MOS, as reported in VQA papers.

SRCC and KRCC measure monotonicity; PLCC and RMSE are reported, by default, after the
4-parameter logistic mapping of VQEG (the prediction scale need not be linear in MOS).
Fewer than 3 pairs or constant inputs have no defined correlation: those give NaN with a
warning, so one bad subset never crashes a whole evaluation.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize, stats

__all__ = ["srcc", "krcc", "plcc", "rmse", "logistic_fit", "correlation_report"]

MIN_SAMPLES = 3
LOGISTIC_PARAMETERS = 4


def _pairs(pred, mos):
    pred = np.asarray(pred, dtype=np.float64).ravel()
    mos = np.asarray(mos, dtype=np.float64).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"predictions ({pred.size}) and MOS ({mos.size}) differ in length")
    if not (np.isfinite(pred).all() and np.isfinite(mos).all()):
        raise ValueError("predictions and MOS must be finite numbers")
    return pred, mos


def _undefined(pred, mos, name):
    """Why the correlation is undefined for these inputs, or None when it is defined."""
    if pred.size < MIN_SAMPLES:
        reason = f"{pred.size} samples (need >= {MIN_SAMPLES})"
    elif np.ptp(pred) == 0:
        reason = "constant predictions"
    elif np.ptp(mos) == 0:
        reason = "constant MOS"
    else:
        return None
    warnings.warn(f"{name} is undefined: {reason}; returning NaN", RuntimeWarning, stacklevel=3)
    return reason


def _logistic4(x, b1, b2, b3, b4):
    with np.errstate(over="ignore"):  # exp overflowing to inf gives the right limit, b2
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / np.abs(b4))) + b2


def logistic_fit(pred, mos):
    """Map predictions onto the MOS scale with the VQEG 4-parameter logistic.

    When the fit does not converge the predictions are returned unchanged, with a warning.
    """
    pred, mos = _pairs(pred, mos)
    if pred.size <= LOGISTIC_PARAMETERS:
        warnings.warn(f"{pred.size} samples are too few for the {LOGISTIC_PARAMETERS}-parameter logistic fit; "
                      "using raw predictions", RuntimeWarning, stacklevel=2)
        return pred
    start = [mos.max(), mos.min(), np.mean(pred), np.std(pred) / 4 or 1.0]
    try:
        with warnings.catch_warnings():
            # The parameter covariance is unused; its "cannot be estimated" warning is noise here.
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(_logistic4, pred, mos, p0=start, maxfev=20000)
    except RuntimeError as error:
        warnings.warn(f"logistic fit did not converge ({error}); using raw predictions", RuntimeWarning,
                      stacklevel=2)
        return pred
    return _logistic4(pred, *params)


def srcc(pred, mos) -> float:
    pred, mos = _pairs(pred, mos)
    if _undefined(pred, mos, "SRCC"):
        return math.nan
    return float(stats.spearmanr(pred, mos).statistic)


def krcc(pred, mos) -> float:
    pred, mos = _pairs(pred, mos)
    if _undefined(pred, mos, "KRCC"):
        return math.nan
    return float(stats.kendalltau(pred, mos).statistic)


def plcc(pred, mos, fit: bool = True) -> float:
    pred, mos = _pairs(pred, mos)
    if _undefined(pred, mos, "PLCC"):
        return math.nan
    if fit:
        pred = logistic_fit(pred, mos)
        if np.ptp(pred) == 0:
            warnings.warn("PLCC is undefined: logistic fit is constant; returning NaN", RuntimeWarning, stacklevel=2)
            return math.nan
    return float(stats.pearsonr(pred, mos).statistic)


def rmse(pred, mos, fit: bool = False) -> float:
    """Root mean squared error; with `fit`, after the logistic mapping (for scales other than MOS)."""
    pred, mos = _pairs(pred, mos)
    if fit:
        if _undefined(pred, mos, "RMSE after logistic fit"):
            return math.nan
        pred = logistic_fit(pred, mos)
    if pred.size == 0:
        warnings.warn("RMSE is undefined: no samples; returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return float(np.sqrt(np.mean((pred - mos) ** 2)))


def correlation_report(pred, mos) -> dict:
    """The four numbers an evaluation prints, plus the sample count."""
    return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos), "krcc": krcc(pred, mos),
            "rmse": rmse(pred, mos), "n": int(np.asarray(pred).size)}
