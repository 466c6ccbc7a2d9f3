"""Elementary functions of the fused loss kernels (``kernels.py``), in the precision of the input.

Numba's ``math.exp`` / ``math.log1p`` are scalar libm calls that stop LLVM from vectorising a row
loop; these fdlibm-style versions are plain arithmetic (no branches, no libm), accurate to about
1 ulp, so the loops in ``kernels.py`` vectorise. ``_ftz`` flushes subnormal gradients to zero
(the reason is in ``kernels.py``'s docstring). Private to ``bll_ref.losses``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = []

_helper = dict(error_model="numpy", nogil=True)  # small helpers; LLVM inlines them into the row loops


# ------------------------------------------------------------------------- elementary functions
# Every kernel computes in the precision of its input (float32 kernels must not promote to
# float64: literals are therefore wrapped in _c). isinstance on a Numba scalar is resolved at
# compile time, so each dtype compiles only its own branch; under NUMBA_DISABLE_JIT it is a
# plain runtime check on the NumPy scalar.

@njit(**_helper)
def _c(x, c):
    """The constant c in the floating type of x."""
    if isinstance(x, np.float32):
        return np.float32(c)
    return np.float64(c)


@njit(**_helper)
def _ftz(v):
    """v, or 0 where |v| is below the smallest normal number of its type (flush to zero)."""
    if isinstance(v, np.float32):
        return v if abs(v) >= np.float32(1.1754943508222875e-38) else np.float32(0.0)
    return v if abs(v) >= 2.2250738585072014e-308 else 0.0


@njit(**_helper)
def _exp_f64(x):
    """e^x in float64 for x <= 709 (0 below -745, as libm); about 1 ulp.

    fdlibm range reduction x = k ln2 + r, |r| <= ln2 / 2 (ln2 split hi + lo), e^r by its Taylor
    series to degree 12 (truncation < 2e-16 relative), 2^k applied in two halves so that results
    in the subnormal range come out right.
    """
    x = min(max(x, -746.0), 709.0)
    kf = np.floor(x * 1.4426950408889634 + 0.5)             # round(x / ln 2)
    r = (x - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10
    p = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (
        1 / 5040 + r * (1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (1 / 39916800 + r * (
            1 / 479001600))))))))))))
    k = np.int64(kf)
    k1 = k >> 1
    return (p * np.int64((k1 + 1023) << 52).view(np.float64)) * np.int64((k - k1 + 1023) << 52).view(np.float64)


@njit(**_helper)
def _exp_f32(x):
    """e^x in float32 for x <= 88.5 (0 below -104); Cephes expf reduction and polynomial, ~1 ulp."""
    x = min(max(x, np.float32(-104.0)), np.float32(88.5))
    kf = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = (x - kf * np.float32(0.693359375)) - kf * np.float32(-2.12194440e-4)
    p = ((((((np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)) * r + np.float32(8.3334519073e-3)) * r
            + np.float32(4.1665795894e-2)) * r + np.float32(1.6666665459e-1)) * r + np.float32(5.0000001201e-1))
         * (r * r) + r + np.float32(1.0))
    k = np.int32(kf)
    k1 = k >> 1
    return (p * np.int32((k1 + 127) << 23).view(np.float32)) * np.int32((k - k1 + 127) << 23).view(np.float32)


@njit(**_helper)
def _exp(x):
    if isinstance(x, np.float32):
        return _exp_f32(x)
    return _exp_f64(x)


@njit(**_helper)
def _log1p_f64(z):
    """log(1 + z) in float64 for -0.5 <= z <= 1 (fdlibm e_log.c kernel, about 1 ulp).

    1 + z = 2^k (1 + f) with k in {-1, 0, 1} and sqrt(2)/2 - 1 <= f <= sqrt(2) - 1; f is formed
    exactly from z (1 + z is never rounded), then log(1 + f) = f - hfsq + s (hfsq + R(s^2)).
    """
    up = z > 0.41421356237309503
    down = z < -0.2928932188134524
    f = (z - 1.0) * 0.5 if up else ((2.0 * z + 1.0) if down else z)
    kf = 1.0 if up else (-1.0 if down else 0.0)
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    w = s * s
    R = w * (6.666666666666735130e-01 + w * (3.999999999940941908e-01 + w * (2.857142874366239149e-01 + w * (
        2.222219843214978396e-01 + w * (1.818357216161805012e-01 + w * (1.531383769920937332e-01 + w * (
            1.479819860511658591e-01)))))))
    return kf * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + R) + kf * 1.90821492927058770002e-10)) - f)


@njit(**_helper)
def _log1p_f32(z):
    """log(1 + z) in float32 for -0.5 <= z <= 1 (fdlibm e_logf.c kernel, about 1 ulp)."""
    up = z > np.float32(0.41421356)
    down = z < np.float32(-0.29289322)
    f = (z - np.float32(1.0)) * np.float32(0.5) if up else ((np.float32(2.0) * z + np.float32(1.0)) if down else z)
    kf = np.float32(1.0) if up else (np.float32(-1.0) if down else np.float32(0.0))
    hfsq = np.float32(0.5) * f * f
    s = f / (np.float32(2.0) + f)
    w = s * s
    R = w * (np.float32(0.66666662693) + w * (np.float32(0.40000972152) + w * (np.float32(0.28498786688)
                                                                            + w * np.float32(0.24279078841))))
    return kf * np.float32(6.9313812256e-01) - ((hfsq - (s * (hfsq + R) + kf * np.float32(9.0580006145e-06))) - f)


@njit(**_helper)
def _log1p(z):
    if isinstance(z, np.float32):
        return _log1p_f32(z)
    return _log1p_f64(z)
