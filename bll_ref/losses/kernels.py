"""Fused Numba kernels for the local estimators; ``local.py`` is their specification.

Each kernel makes ONE pass over a 2-D (N, D) array pair and writes both gradients plus the
per-row loss (callers reshape (N, ...) to (N, D); the wrappers below do it). The public wrappers
have the signatures and returns of their ``local`` twins, plus a keyword ``parallel``.

Precision: a kernel computes in the dtype of its input, with the formulas of ``local.py`` (the
loss terms too, summed per row in float64, pairwise), so float32 stays float32 end to end.
Differences from ``local`` are rounding only: the exp/log1p below instead of NumPy's, x * (1/N)
instead of x / N, 1/(1+e) computed once and multiplied, and the Bernoulli softplus difference
in one log1p (see ``_bernoulli_kl``). Float64 results agree with ``local`` to ~1e-15 relative to
the size of the terms; float32 results to a few float32 roundings of those terms (tests pin both).

Why hand-written exp and log1p: Numba's ``math.exp`` / ``math.log1p`` are scalar libm calls
that stop LLVM from vectorising the loop, and NumPy's own are SIMD; the fdlibm-style versions
below are plain arithmetic (no branches, no libm), so each row loop vectorises, and they are
accurate to about 1 ulp. ``error_model="numpy"`` stops Numba inserting ZeroDivisionError
checks (which also block vectorisation); no division here can see a zero. No fastmath: the
results must not depend on the compiler's choice of reassociation or FMA contraction.

Bernoulli and Poisson gradients whose magnitude is below the smallest normal number of their dtype
(float32: 1.2e-38) are written as 0 (``_ftz``): a saturated sigmoid makes rho (1 - rho) b underflow
into subnormals, and the weight-gradient GEMM that consumes them then runs many times slower
(microcode assists on x86; the Eq. 8 row of benchmarks/step_time.py, random labels, went from 67.8
to 27.4 ms). That differs from ``local`` by less than ``tiny``, which the tests
allow. Gaussian gradients are linear in their inputs, subnormal only where those already are, and
are left alone (the select would only add work to that lean loop).

Kernels are pure (arrays in, preallocated outputs, no globals, no randomness) and plain Python
under ``NUMBA_DISABLE_JIT=1``. Each has a serial and a ``prange`` (rows in parallel) driver; the
wrappers pick prange only from ``PARALLEL_MIN_SIZE`` elements and ``PARALLEL_MIN_THREADS``
threads up (``parallel=True/False`` forces it): at 128 x 1024, and on a 2-core machine shared
with other jobs, thread hand-off costs more than it saves (``benchmarks/bench_kernels.py``).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .expfam import Bernoulli, Gaussian, Poisson, get_family
from .local import _check_arrays, _check_m, _finite_loss

__all__ = [
    "kl", "ef_gradients", "kl_ef_gradients", "bernoulli_eq8", "gaussian_s12", "poisson_s13",
    "PARALLEL_MIN_SIZE", "PARALLEL_MIN_THREADS",
]

#: By default rows run in parallel only for batches of at least this many elements (N * D) ...
PARALLEL_MIN_SIZE = 1 << 20
#: ... and only with at least this many Numba threads: below that, thread hand-off costs more than
#: it saves (measurements: benchmarks/results/kernels.md).
PARALLEL_MIN_THREADS = 4

_jit = dict(cache=True, error_model="numpy", nogil=True)  # nogil: pipeline worker threads run kernels side by side
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


@njit(**_helper)
def _sigmoid_parts(x, e):
    """(S(x), S(x) S(-x), 1 / (1 + e)) given e = e^{-|x|}: the Bernoulli mu and var (Eq. S9)."""
    one = _c(x, 1.0)
    r = one / (one + e)
    return (one if x >= 0 else e) * r, e * r * r, r


@njit(**_helper)
def _bernoulli_kl(x, g, mu_g, e_x, e_g, r_g):
    """A(x) - A(g) - mu(g) (x - g) for Bernoulli (Eq. S7): softplus difference in one log1p.

    log1p(e_x) - log1p(e_g) = log1p((e_x - e_g) / (1 + e_g)), whose argument lies in [-1/2, 1].
    """
    zero = _c(x, 0.0)
    return (max(x, zero) - max(g, zero)) + _log1p((e_x - e_g) * r_g) - mu_g * (x - g)


@njit(**_helper)
def _pairwise_sum(buf):
    """Sum of buf (destroyed) by in-place halving: vectorisable, deterministic, pairwise-accurate."""
    k = buf.shape[0]
    if k == 0:
        return 0.0
    while k > 1:
        h = k // 2
        for j in range(h):
            buf[j] += buf[j + h]
        if k % 2 == 1:
            buf[0] += buf[k - 1]
        k = h
    return buf[0]


# ------------------------------------------------------------------------------------ row kernels
# Each row kernel handles row i: x, y are (phi, gamma) for the KL/EF kernels and (a, b) for the
# printed estimators; m, p (the family parameter: s2 or eta_max, unused for Bernoulli) and
# inv_n = 1/N are scalars of the array's dtype; o1, o2 receive the two gradients. Scratch rows:
# buf (D,) float64 for the loss terms (computed in the array's dtype, as in local.py), tmp (2, D)
# of the array's dtype for the exponentials. Returns the row's loss sum (float64).
#
# The exponentials go through tmp in a first loop over the row: the row stays in L1, so this is
# still one pass over memory, and two short loops vectorise with fewer register spills than one
# long one (measured ~25 % faster).

@njit(**_helper)
def _bernoulli_kl_ef_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    e_x, e_y = tmp[0], tmp[1]
    for j in range(x.shape[1]):
        e_x[j] = _exp(-abs(x[i, j]))
        e_y[j] = _exp(-abs(y[i, j]))
    for j in range(x.shape[1]):
        phi = x[i, j]
        gam = y[i, j]
        mu_p, var_p, r_p = _sigmoid_parts(phi, e_x[j])
        mu_g, var_g, r_g = _sigmoid_parts(gam, e_y[j])
        o1[i, j] = _ftz(-(mu_g - mu_p) * inv_n)  # Eq. 7 forward weight
        o2[i, j] = _ftz(var_g * (gam - phi) * inv_n)  # Eq. 7 posterior weight
        buf[j] = _bernoulli_kl(phi, gam, mu_g, e_x[j], e_y[j], r_g)
    return _pairwise_sum(buf)


@njit(**_helper)
def _gaussian_kl_ef_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    h = _c(p, 0.5) * p
    for j in range(x.shape[1]):
        phi = x[i, j]
        gam = y[i, j]
        mu_g = p * gam
        o1[i, j] = -(mu_g - p * phi) * inv_n
        o2[i, j] = p * (gam - phi) * inv_n
        buf[j] = h * (phi * phi) - h * (gam * gam) - mu_g * (phi - gam)
    return _pairwise_sum(buf)


@njit(**_helper)
def _poisson_kl_ef_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    e_x, e_y = tmp[0], tmp[1]
    for j in range(x.shape[1]):
        e_x[j] = _exp(min(x[i, j], p))                     # eta clipped at eta_max (expfam.Poisson)
        e_y[j] = _exp(min(y[i, j], p))
    for j in range(x.shape[1]):
        phi = x[i, j]
        gam = y[i, j]
        e_p = e_x[j]
        e_g = e_y[j]
        o1[i, j] = _ftz(-(e_g - e_p) * inv_n)
        o2[i, j] = _ftz(e_g * (gam - phi) * inv_n)
        buf[j] = e_p - e_g - e_g * (phi - gam)
    return _pairwise_sum(buf)


@njit(**_helper)
def _bernoulli_eq8_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    e_x, e_y = tmp[0], tmp[1]
    for j in range(x.shape[1]):
        e_x[j] = _exp(-abs(x[i, j]))
        e_y[j] = _exp(-abs(x[i, j] + m * y[i, j]))
    for j in range(x.shape[1]):
        a = x[i, j]
        b = y[i, j]
        g = a + m * b                                      # Eq. 9
        alpha, var_a, r_a = _sigmoid_parts(a, e_x[j])
        rho, var_g, r_g = _sigmoid_parts(g, e_y[j])
        post = var_g * b                                   # Eq. 8 posterior weight rho(1-rho) b
        o1[i, j] = _ftz((-(rho - alpha) + post) * inv_n)  # Eq. 8 forward weight (rho - alpha)
        o2[i, j] = _ftz(post * inv_n)
        buf[j] = _bernoulli_kl(a, g, rho, e_x[j], e_y[j], r_g)
    return _pairwise_sum(buf)


@njit(**_helper)
def _gaussian_s12_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    h = _c(p, 0.5) * p
    for j in range(x.shape[1]):
        a = x[i, j]
        b = y[i, j]
        g = a + m * b
        mu_g = p * g
        post = p * b                                       # S12 posterior weight sigma^2 b
        o1[i, j] = (-(mu_g - p * a) + post) * inv_n  # S11 forward weight s2 (gamma - phi)
        o2[i, j] = post * inv_n
        buf[j] = h * (a * a) - h * (g * g) - mu_g * (a - g)
    return _pairwise_sum(buf)


@njit(**_helper)
def _poisson_s13_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    e_x, e_y = tmp[0], tmp[1]
    for j in range(x.shape[1]):
        e_x[j] = _exp(min(x[i, j], p))
        e_y[j] = _exp(min(x[i, j] + m * y[i, j], p))
    for j in range(x.shape[1]):
        a = x[i, j]
        b = y[i, j]
        g = a + m * b
        alpha = e_x[j]
        rho = e_y[j]
        post = rho * b                                     # S13 posterior weight rho b
        o1[i, j] = _ftz((-(rho - alpha) + post) * inv_n)
        o2[i, j] = _ftz(post * inv_n)
        buf[j] = alpha - rho - rho * (a - g)
    return _pairwise_sum(buf)


# -------------------------------------------------------------------------------------- drivers
# One serial and one prange driver per estimator, all with the signature
#     kernel(x, y, m, p, o1, o2, row_loss) -> None
# x, y: (N, D) C-contiguous, same dtype; m, p: scalars of that dtype; o1, o2: (N, D) outputs of
# that dtype; row_loss: (N,) float64. (The Gaussian rows need no tmp.)

@njit(**_jit)
def bernoulli_kl_ef_serial(x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _bernoulli_kl_ef_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def bernoulli_kl_ef_parallel(x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _bernoulli_kl_ef_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                                        np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype), i)


@njit(**_jit)
def gaussian_kl_ef_serial(x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, 0), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _gaussian_kl_ef_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def gaussian_kl_ef_parallel(x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _gaussian_kl_ef_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                                        np.empty(x.shape[1]), np.empty((2, 0), x.dtype), i)


@njit(**_jit)
def poisson_kl_ef_serial(x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _poisson_kl_ef_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def poisson_kl_ef_parallel(x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _poisson_kl_ef_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                                        np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype), i)


@njit(**_jit)
def bernoulli_eq8_serial(x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _bernoulli_eq8_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def bernoulli_eq8_parallel(x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _bernoulli_eq8_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                                        np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype), i)


@njit(**_jit)
def gaussian_s12_serial(x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, 0), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _gaussian_s12_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def gaussian_s12_parallel(x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _gaussian_s12_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                                        np.empty(x.shape[1]), np.empty((2, 0), x.dtype), i)


@njit(**_jit)
def poisson_s13_serial(x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _poisson_s13_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def poisson_s13_parallel(x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _poisson_s13_row(x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                                        np.empty(x.shape[1]), np.empty((2, x.shape[1]), x.dtype), i)


_KL_EF = {
    Bernoulli: (bernoulli_kl_ef_serial, bernoulli_kl_ef_parallel),
    Gaussian: (gaussian_kl_ef_serial, gaussian_kl_ef_parallel),
    Poisson: (poisson_kl_ef_serial, poisson_kl_ef_parallel),
}


# ------------------------------------------------------------------------------------- wrappers
def _family_param(fam) -> float:
    return float(fam.s2) if isinstance(fam, Gaussian) else float(getattr(fam, "eta_max", 0.0))


def _run(kernels, x, y, m, p, parallel):
    """Reshape (N, ...) -> (N, D), allocate outputs, run the serial or prange kernel."""
    shape, n = x.shape, x.shape[0]
    x2 = np.ascontiguousarray(x.reshape(n, -1))
    y2 = np.ascontiguousarray(y.reshape(n, -1))
    o1, o2 = np.empty_like(x2), np.empty_like(x2)
    row_loss = np.empty(n, np.float64)
    if parallel is None:
        parallel = (n > 1 and x2.size >= PARALLEL_MIN_SIZE
                    and numba.get_num_threads() >= PARALLEL_MIN_THREADS)
    t = x2.dtype.type
    with np.errstate(under="ignore"):  # only matters under NUMBA_DISABLE_JIT (NumPy scalar maths)
        kernels[1 if parallel else 0](x2, y2, t(m), t(p), o1, o2, row_loss)
    return _finite_loss(float(row_loss.sum() / n)), o1.reshape(shape), o2.reshape(shape)


def kl_ef_gradients(family, phi, gamma, *, parallel=None):
    """Fused ``local.kl_ef_gradients``: (loss, g_phi, g_gamma) in one pass (Eq. S7, Eq. 7 / S8).

    ``parallel``: None chooses (PARALLEL_MIN_SIZE elements and PARALLEL_MIN_THREADS threads or
    more), True/False forces the prange/serial kernel.
    """
    fam = get_family(family)
    phi, gamma = _check_arrays(("phi", "gamma"), phi, gamma)
    return _run(_KL_EF[type(fam)], phi, gamma, 0.0, _family_param(fam), parallel)


def kl(family, phi, gamma, *, parallel=None) -> float:
    """Fused ``local.kl``: KL(rho || alpha), mean over the batch of the sum over units."""
    return kl_ef_gradients(family, phi, gamma, parallel=parallel)[0]


def ef_gradients(family, phi, gamma, *, parallel=None):
    """Fused ``local.ef_gradients``: (g_phi, g_gamma)."""
    return kl_ef_gradients(family, phi, gamma, parallel=parallel)[1:]


def bernoulli_eq8(a, b, m, *, parallel=None):
    """Fused ``local.bernoulli_eq8`` (Eq. 8/9 as printed): (loss, g_a, g_b)."""
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    return _run((bernoulli_eq8_serial, bernoulli_eq8_parallel), a, b, m, 0.0, parallel)


def gaussian_s12(a, b, m, s2=1.0, *, parallel=None):
    """Fused ``local.gaussian_s12`` (Eq. S11/S12 in Eq. 8 form): (loss, g_a, g_b)."""
    m = _check_m(m)
    fam = Gaussian(s2)
    a, b = _check_arrays(("a", "b"), a, b)
    return _run((gaussian_s12_serial, gaussian_s12_parallel), a, b, m, fam.s2, parallel)


def poisson_s13(a, b, m, *, parallel=None):
    """Fused ``local.poisson_s13`` (Eq. S13 in Eq. 8 form, eta clipped at 80): (loss, g_a, g_b)."""
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    return _run((poisson_s13_serial, poisson_s13_parallel), a, b, m, Poisson().eta_max, parallel)
