"""Optional numba.cuda kernels: Eq. 8/9 (Bernoulli) and the Gaussian KL / Eq. 7 gradients.

One thread per element on the flattened (N, ...) arrays; each block reduces its loss terms in
shared memory (float64) and writes one partial sum, which the host adds up (deterministic, no
atomics). The device computes in float64 and stores the gradients in the input dtype. The
wrappers copy the inputs to the device and the results back, so they take and return NumPy
arrays with the signatures of their ``local`` twins.

Importing this module never needs a GPU: kernels compile on first launch. ``available()`` says
whether a launch can work (a CUDA GPU, or the simulator: set ``NUMBA_ENABLE_CUDASIM=1`` before
numba.cuda is first imported, which is how the tests run this code on a CPU).
"""
from __future__ import annotations

import math

import numpy as np

from .expfam import Gaussian, get_family
from .local import _check_arrays, _check_m, _finite_loss

try:  # numba.cuda imports without a GPU or toolkit; guard anyway (stripped-down numba builds)
    import numba
    from numba import cuda
except Exception as exc:  # pragma: no cover - depends on the numba build
    cuda, _IMPORT_ERROR = None, exc
else:
    _IMPORT_ERROR = None

__all__ = ["available", "bernoulli_eq8", "kl_ef_gradients", "ef_gradients", "THREADS"]

#: Threads per block (a power of two: the shared-memory reduction halves it).
THREADS = 128


def available() -> bool:
    """True if numba.cuda can launch kernels here (real GPU or NUMBA_ENABLE_CUDASIM=1)."""
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - driver errors
        return False


if cuda is not None:
    @cuda.jit(device=True)
    def _block_sum(term, partial):
        """Tree-reduce one float64 per thread in shared memory; thread 0 writes the block's sum."""
        sm = cuda.shared.array(THREADS, numba.float64)
        t = cuda.threadIdx.x
        sm[t] = term
        cuda.syncthreads()
        s = THREADS // 2
        while s > 0:
            if t < s:
                sm[t] += sm[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            partial[cuda.blockIdx.x] = sm[0]

    @cuda.jit
    def _bernoulli_eq8_kernel(a, b, m, inv_n, g_a, g_b, partial):
        k = cuda.grid(1)
        term = 0.0
        if k < a.size:
            x = numba.float64(a[k])
            y = numba.float64(b[k])
            g = x + m * y                                   # Eq. 9
            e_a = math.exp(-abs(x))
            e_g = math.exp(-abs(g))
            r_a = 1.0 / (1.0 + e_a)
            r_g = 1.0 / (1.0 + e_g)
            alpha = (1.0 if x >= 0 else e_a) * r_a
            rho = (1.0 if g >= 0 else e_g) * r_g
            post = e_g * r_g * r_g * y                      # Eq. 8 posterior weight rho(1-rho) b
            g_a[k] = (-(rho - alpha) + post) * inv_n        # Eq. 8 forward weight (rho - alpha)
            g_b[k] = post * inv_n
            term = (max(x, 0.0) - max(g, 0.0)) + (math.log1p(e_a) - math.log1p(e_g)) - rho * (x - g)
        _block_sum(term, partial)

    @cuda.jit
    def _gaussian_kl_ef_kernel(phi, gamma, s2, inv_n, g_phi, g_gamma, partial):
        k = cuda.grid(1)
        term = 0.0
        if k < phi.size:
            p = numba.float64(phi[k])
            g = numba.float64(gamma[k])
            h = 0.5 * s2
            mu_g = s2 * g
            g_phi[k] = -(mu_g - s2 * p) * inv_n             # Eq. 7 forward weight
            g_gamma[k] = s2 * (g - p) * inv_n               # Eq. 7 posterior weight
            term = h * (p * p) - h * (g * g) - mu_g * (p - g)   # Eq. S7
        _block_sum(term, partial)


def _launch(kernel, x, y, scalar, n):
    if not available():
        why = f"numba.cuda failed to import: {_IMPORT_ERROR}" if cuda is None else "no CUDA GPU found"
        raise RuntimeError(f"bll_ref.losses.cuda needs a CUDA GPU ({why}); use bll_ref.losses.kernels "
                           f"on the CPU, or set NUMBA_ENABLE_CUDASIM=1 before importing numba to simulate")
    shape = x.shape
    xf, yf = np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(y).reshape(-1)
    blocks = max(1, -(-xf.size // THREADS))
    d_x, d_y = cuda.to_device(xf), cuda.to_device(yf)
    d_o1, d_o2 = cuda.device_array_like(xf), cuda.device_array_like(xf)
    d_partial = cuda.device_array(blocks, np.float64)
    kernel[blocks, THREADS](d_x, d_y, float(scalar), 1.0 / n, d_o1, d_o2, d_partial)
    partial = d_partial.copy_to_host()
    return (_finite_loss(float(partial.sum() / n)), d_o1.copy_to_host().reshape(shape),
            d_o2.copy_to_host().reshape(shape))


def bernoulli_eq8(a, b, m):
    """GPU ``local.bernoulli_eq8`` (Eq. 8/9 as printed): (loss, g_a, g_b)."""
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    return _launch(_bernoulli_eq8_kernel if cuda is not None else None, a, b, m, a.shape[0])


def kl_ef_gradients(family, phi, gamma):
    """GPU ``local.kl_ef_gradients`` for the Gaussian family only: (loss, g_phi, g_gamma)."""
    fam = get_family(family)
    if not isinstance(fam, Gaussian):
        raise ValueError(f"bll_ref.losses.cuda has a kernel for the Gaussian family only, got {fam!r}; "
                         f"use bll_ref.losses.kernels.kl_ef_gradients for the others")
    phi, gamma = _check_arrays(("phi", "gamma"), phi, gamma)
    return _launch(_gaussian_kl_ef_kernel if cuda is not None else None, phi, gamma, fam.s2, phi.shape[0])


def ef_gradients(family, phi, gamma):
    """GPU ``local.ef_gradients`` for the Gaussian family only: (g_phi, g_gamma)."""
    return kl_ef_gradients(family, phi, gamma)[1:]
