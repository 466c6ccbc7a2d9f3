"""Calibration: the Q format (fractional bits) for a weight tensor or a batch of activations.

Weights get the most fractional bits that hold their absolute maximum (per tensor, or per output
channel); activations the same for a percentile of their range, or the frac that minimises the
mean squared quantisation error (``calibrate_activation_mse``); a classifier's narrow output the
frac that keeps its argmax (``calibrate_argmax``).
"""
from __future__ import annotations

import math

import numpy as np

from .qformat import _FRAC_MAX, _FRAC_MIN, QFormat, dequantize, quantize

__all__ = ["calibrate_weight", "calibrate_weight_per_channel", "calibrate_activation", "calibrate_activation_mse",
           "calibrate_argmax"]


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def _ldexp(v, e):
    try:
        return math.ldexp(v, e)
    except OverflowError:
        return math.copysign(math.inf, v)


def _fit_frac(lo, hi, width, signed):
    """Largest frac in [-64, 64] with lo * 2**frac >= min_code and hi * 2**frac <= max_code."""
    proto = QFormat(width, 0, signed)
    if not signed:
        lo = 0.0                                 # negative values saturate to 0 in unsigned formats
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if lo == 0.0 and hi == 0.0:                  # all zero: any frac is exact; use the unit range
        return width - 1 if signed else width

    def fits(f):
        return _ldexp(hi, f) <= proto.max_code and _ldexp(lo, f) >= proto.min_code

    f = (width - 1 if signed else width) - math.frexp(max(hi, -lo))[1]
    f = min(max(f, _FRAC_MIN), _FRAC_MAX)
    while f < _FRAC_MAX and fits(f + 1):
        f += 1
    while f > _FRAC_MIN and not fits(f):
        f -= 1
    return f


def _finite_array(x, who):
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise ValueError(f"{who} expects a non-empty array")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{who} expects finite values, got NaN or inf")
    return x


def calibrate_weight(w, width: int, *, signed=True, rounding="nearest", overflow="saturate") -> QFormat:
    """Per-tensor power-of-two format for weights: the largest ``frac`` such that every element
    of ``w`` lies in [min_code, max_code] * 2**-frac (no saturation, whatever the rounding).
    The negative side uses the full -2**(width-1) (e.g. w in [-1, 0.5] gets frac = width - 1).
    An all-zero tensor gets frac = width - 1 (any frac represents it exactly)."""
    w = _finite_array(w, "calibrate_weight")
    frac = _fit_frac(w.min(), w.max(), int(width), signed)
    return QFormat(width, frac, signed, rounding, overflow)


def calibrate_activation(x, width: int, percentile: float = 100.0, *, signed=True,
                         rounding="nearest", overflow="saturate") -> QFormat:
    """Per-tensor format from a calibration batch: with ``m = percentile(|x|, percentile)``, fit
    the range [max(min x, -m), min(max x, m)] as :func:`calibrate_weight` does.  percentile=100
    fits every calibration value; lower values clip outliers (they saturate at run time)."""
    x = _finite_array(x, "calibrate_activation")
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"calibrate_activation: percentile must be in (0, 100], got {percentile}")
    m = float(np.percentile(np.abs(x), percentile))
    lo, hi = max(float(x.min()), -m), min(float(x.max()), m)
    return QFormat(width, _fit_frac(lo, hi, int(width), signed), signed, rounding, overflow)



def calibrate_weight_per_channel(w, width: int, axis: int, *, signed=True, rounding="nearest",
                                 overflow="saturate"):
    """One power-of-two format per output channel (TFLite / CMSIS-NN use per-channel scales; here
    the scales are powers of two): ``fracs[o]`` is :func:`calibrate_weight`'s frac of the slice
    ``w`` at index o along ``axis``.

    Returns
    -------
    fmt : QFormat with frac = min(fracs) (the coarsest channel; width, signedness and modes of all)
    fracs : (w.shape[axis],) int64
    """
    w = _finite_array(w, "calibrate_weight_per_channel")
    w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    fracs = _fit_fracs(w.min(axis=1, initial=0.0), w.max(axis=1, initial=0.0), int(width), signed)
    return QFormat(width, int(fracs.min()), signed, rounding, overflow), fracs


def _fit_fracs(lo, hi, width, signed):
    """:func:`_fit_frac` of every (lo[i], hi[i]) at once (int64 array); a test pins the equality."""
    proto = QFormat(width, 0, signed)
    lo = np.zeros_like(lo) if not signed else np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    m = np.maximum(hi, -lo)
    base = width - 1 if signed else width

    def fits(f):
        with np.errstate(over="ignore"):
            return (np.ldexp(hi, f) <= proto.max_code) & (np.ldexp(lo, f) >= proto.min_code)

    f = np.clip(base - np.frexp(np.where(m > 0, m, 1.0))[1], _FRAC_MIN, _FRAC_MAX).astype(np.int64)
    for _ in range(2):                        # the frexp guess is off by at most one either way
        f = np.where((f < _FRAC_MAX) & fits(np.minimum(f + 1, _FRAC_MAX)), f + 1, f)
    for _ in range(2):
        f = np.where((f > _FRAC_MIN) & ~fits(f), f - 1, f)
    return np.where(m > 0, f, base).astype(np.int64)


def calibrate_activation_mse(x, width: int, *, signed=True, rounding="nearest", overflow="saturate",
                             max_samples=1 << 18) -> QFormat:
    """Per-tensor format that minimises the quantisation error: among the fracs from the one that
    fits every value (:func:`calibrate_weight`'s) up to ``width`` more (finer steps, more clipping),
    the one with the smallest mean squared error ``mean((dequantize(quantize(x)) - x)**2)`` on the
    calibration values (ties: the smaller frac).  For an unsigned format, negative values count
    as the 0 they become (the format follows a ReLU).  Large inputs are subsampled evenly to
    ``max_samples`` values."""
    x = _finite_array(x, "calibrate_activation_mse").ravel()
    if x.size > max_samples:
        x = x[np.linspace(0, x.size - 1, max_samples).astype(np.int64)]
    if not signed:
        x = np.maximum(x, 0.0)
    f0 = _fit_frac(x.min(), x.max(), int(width), signed)
    best, best_err = None, math.inf
    for f in range(f0, min(f0 + int(width), _FRAC_MAX) + 1):
        fmt = QFormat(width, f, signed, rounding, overflow)
        err = float(np.mean((dequantize(quantize(x, fmt), fmt) - x) ** 2))
        if err < best_err:
            best, best_err = fmt, err
    return best


def calibrate_argmax(logits, width: int, *, rounding="nearest", overflow="saturate") -> QFormat:
    """Signed format for a classifier's output that is read by argmax: the largest frac at which
    every calibration row's runner-up (its second-largest value) stays at or below max_code - 1
    (any rounding).  The winner of a row may saturate at max_code and still wins (strictly, for
    width >= 3); values far below saturate at min_code and never win.  So
    the range is spent where argmax looks, not on the large negative logits that set a range
    calibration (10-epoch MLPs: logit magnitudes up to ~150-200, runner-ups <= 5.6; 4-bit logits
    then got frac -4 (step 16, 53 % test accuracy) against frac 0 here (84 %), and 8-bit logits
    frac 0 against 4 (argmax agreement with float 97.0 % -> 99.4 %), issue 24).

    Parameters
    ----------
    logits : (N, C) float array, C >= 2, the float model's outputs on the calibration batch
    width : int, bits of the output

    Returns
    -------
    QFormat (signed)
    """
    if overflow != "saturate":
        raise ValueError("calibrate_argmax needs overflow='saturate': a winner beyond max_code must stay the "
                         "largest code, and wrapping would make it negative")
    y = _finite_array(logits, "calibrate_argmax")
    if y.ndim != 2 or y.shape[1] < 2:
        raise ValueError(f"calibrate_argmax expects (N, C >= 2) classifier outputs, got shape {y.shape}")
    runner_up = float(np.partition(y, -2, axis=1)[:, -2].max())
    top = QFormat(width, 0, True).max_code
    # runner_up * 2**f <= max_code - 1  <=>  (runner_up * max_code / (max_code - 1)) * 2**f <= max_code
    hi = runner_up * top / (top - 1) if top > 1 and runner_up > 0 else runner_up
    return QFormat(width, _fit_frac(0.0, hi, int(width), True), True, rounding, overflow)
