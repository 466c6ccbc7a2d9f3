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
to 27.4 ms). That differs from ``local`` by less than ``tiny``, which the tests allow. Gaussian gradients are linear in their inputs, subnormal only where those already are, and
are left alone (the select would only add work to that lean loop).

Kernels are pure (arrays in, preallocated outputs, no randomness) and plain Python under
``NUMBA_DISABLE_JIT=1``. A serial and a ``prange`` driver run any estimator's rows; the wrappers
pick prange only from ``PARALLEL_MIN_SIZE`` elements and ``PARALLEL_MIN_THREADS`` threads up
(``parallel=True/False`` forces it): at 128 x 1024 on 2 shared cores, thread hand-off costs more
than it saves (``benchmarks/bench_kernels.py``).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .expfam import Bernoulli, Gaussian, Poisson, get_family
from .elementary import _c, _ftz, _exp, _log1p
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
# One serial and one prange driver for every estimator: ``kind`` picks the row function (a branch
# per row, not per element). Signature: driver(kind, x, y, m, p, o1, o2, row_loss) -> None
# x, y: (N, D) C-contiguous, same dtype; m, p: scalars of that dtype; o1, o2: (N, D) outputs of
# that dtype; row_loss: (N,) float64. (The Gaussian rows need no tmp: it is (2, 0) for them.)
# Plain njit functions, not generated ones: Numba caches neither closures nor functions taking a
# dispatcher argument, and every process would compile them again.
BERNOULLI_KL_EF, GAUSSIAN_KL_EF, POISSON_KL_EF, BERNOULLI_EQ8, GAUSSIAN_S12, POISSON_S13 = range(6)
_NEEDS_TMP = (True, False, True, True, False, True)


@njit(**_jit)
def _row(kind, x, y, m, p, inv_n, o1, o2, buf, tmp, i):
    if kind == BERNOULLI_KL_EF:
        return _bernoulli_kl_ef_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i)
    if kind == GAUSSIAN_KL_EF:
        return _gaussian_kl_ef_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i)
    if kind == POISSON_KL_EF:
        return _poisson_kl_ef_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i)
    if kind == BERNOULLI_EQ8:
        return _bernoulli_eq8_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i)
    if kind == GAUSSIAN_S12:
        return _gaussian_s12_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i)
    return _poisson_s13_row(x, y, m, p, inv_n, o1, o2, buf, tmp, i)


@njit(**_jit)
def estimator_serial(kind, tmp_width, x, y, m, p, o1, o2, row_loss):
    buf, tmp = np.empty(x.shape[1]), np.empty((2, tmp_width), x.dtype)
    for i in range(x.shape[0]):
        row_loss[i] = _row(kind, x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2, buf, tmp, i)


@njit(parallel=True, **_jit)
def estimator_parallel(kind, tmp_width, x, y, m, p, o1, o2, row_loss):
    for i in prange(x.shape[0]):
        row_loss[i] = _row(kind, x, y, m, p, _c(m, 1.0 / x.shape[0]), o1, o2,
                           np.empty(x.shape[1]), np.empty((2, tmp_width), x.dtype), i)


_KL_EF = {Bernoulli: BERNOULLI_KL_EF, Gaussian: GAUSSIAN_KL_EF, Poisson: POISSON_KL_EF}


# ------------------------------------------------------------------------------------- wrappers
def _family_param(fam) -> float:
    return float(fam.s2) if isinstance(fam, Gaussian) else float(getattr(fam, "eta_max", 0.0))


def _run(kind, x, y, m, p, parallel):
    """Reshape (N, ...) -> (N, D), allocate outputs, run the serial or prange driver of ``kind``."""
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
        driver = estimator_parallel if parallel else estimator_serial
        driver(kind, x2.shape[1] if _NEEDS_TMP[kind] else 0, x2, y2, t(m), t(p), o1, o2, row_loss)
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
    return _run(BERNOULLI_EQ8, a, b, m, 0.0, parallel)


def gaussian_s12(a, b, m, s2=1.0, *, parallel=None):
    """Fused ``local.gaussian_s12`` (Eq. S11/S12 in Eq. 8 form): (loss, g_a, g_b)."""
    m = _check_m(m)
    fam = Gaussian(s2)
    a, b = _check_arrays(("a", "b"), a, b)
    return _run(GAUSSIAN_S12, a, b, m, fam.s2, parallel)


def poisson_s13(a, b, m, *, parallel=None):
    """Fused ``local.poisson_s13`` (Eq. S13 in Eq. 8 form, eta clipped at 80): (loss, g_a, g_b)."""
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    return _run(POISSON_S13, a, b, m, Poisson().eta_max, parallel)
