"""Optional numba.cuda kernels: Eq. 8/9 (Bernoulli) and the Gaussian KL / Eq. 7 gradients.

One thread per element on the flattened (N, ...) arrays; each block reduces its loss terms in
shared memory (float64) and writes one partial sum, and one more block adds the partial sums up
on the device (in a fixed order: deterministic, no atomics). The device computes in float64 and
stores the gradients in the input dtype.

Two ways to call every function:

- **host arrays in, host arrays out** (NumPy, or anything ``np.asarray`` takes): the signatures
  and returns of the ``local`` twins. The inputs are copied to the device and the gradients
  and the loss back; float32 and float64 inputs are promoted to their common dtype.
- **device arrays in, device arrays out**: numba device arrays (``numba.cuda.to_device``,
  ``device_array``) or anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors;
  read through ``numba.cuda.as_cuda_array``, a view, no copy). Nothing is copied to or from the
  host: the gradients come back as numba device arrays of the input shape and dtype (CuPy
  takes them without a copy: ``cupy.asarray(g)``), and the loss as a device array of shape
  (1,), float64, so a GPU training step never waits for a host transfer. Both inputs must then
  be on the device, C-contiguous, and of the same float32 / float64 dtype (there is no device
  promotion); anything else is a ValueError naming the argument. The non-finite check of the
  host path (ValueError on a NaN / inf loss) needs the loss on the host, so on the device path
  a NaN or inf among the inputs shows up as a non-finite loss instead.

Importing this module never needs a GPU: kernels compile on first launch. ``available()`` says
whether a launch can work (a CUDA GPU, or the simulator: set ``NUMBA_ENABLE_CUDASIM=1`` before
numba.cuda is first imported, which is how the tests run this code on a CPU; the simulator's
device arrays are numba's, it cannot read other libraries' ``__cuda_array_interface__``).
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

__all__ = ["available", "is_device_array", "bernoulli_eq8", "kl_ef_gradients", "ef_gradients", "THREADS"]

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


def is_device_array(x) -> bool:
    """True for a numba device array (also the simulator's) or anything with
    ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors, ...)."""
    return bool(getattr(x, "__cuda_ndarray__", False)) or hasattr(x, "__cuda_array_interface__")


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
    def _sum_partials_kernel(partial, inv_n, loss):
        """One block: thread t adds partial[t], partial[t + THREADS], ... in order, then the tree;
        loss[0] = the batch mean (a fixed order for a given size: deterministic)."""
        t = cuda.threadIdx.x
        term = 0.0
        for k in range(t, partial.size, THREADS):
            term += partial[k]
        _block_sum(term * inv_n, loss)

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


def _require_cuda():
    if not available():
        why = f"numba.cuda failed to import: {_IMPORT_ERROR}" if cuda is None else "no CUDA GPU found"
        raise RuntimeError(f"bll_ref.losses.cuda needs a CUDA GPU ({why}); use bll_ref.losses.kernels "
                           f"on the CPU, or set NUMBA_ENABLE_CUDASIM=1 before importing numba to simulate")


def _device_view(x, name):
    """A numba device array for a device input (a view: no copy), validated like ``local``'s
    host inputs, plus float dtype and C order (the kernels index the flat buffer)."""
    d = x if getattr(x, "__cuda_ndarray__", False) else cuda.as_cuda_array(x)
    dtype = np.dtype(d.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be a float32 or float64 device array, got dtype {dtype}")
    if len(d.shape) < 1 or d.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with a batch of N >= 1 first, got {tuple(d.shape)}")
    if not d.is_c_contiguous():
        raise ValueError(f"{name} must be a C-contiguous device array (the kernels read the flat "
                         f"buffer), got shape {tuple(d.shape)} with strides {tuple(d.strides)}; pass a "
                         f"contiguous copy (e.g. cupy.ascontiguousarray)")
    return d


def _device_pair(names, x, y):
    """Both inputs as validated device arrays of one shape and dtype."""
    on_dev = (is_device_array(x), is_device_array(y))
    if on_dev[0] != on_dev[1]:
        dev, host = (names[0], names[1]) if on_dev[0] else (names[1], names[0])
        raise ValueError(f"{dev} is a device array but {host} is not: pass both on the device "
                         f"(numba.cuda.to_device({host})) or both on the host")
    dx, dy = _device_view(x, names[0]), _device_view(y, names[1])
    if tuple(dx.shape) != tuple(dy.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (N, ...), "
                         f"got {tuple(dx.shape)} and {tuple(dy.shape)}")
    if np.dtype(dx.dtype) != np.dtype(dy.dtype):
        raise ValueError(f"{names[0]} and {names[1]} must have the same dtype on the device (there is "
                         f"no device promotion), got {np.dtype(dx.dtype)} and {np.dtype(dy.dtype)}")
    return dx, dy


def _launch(kernel, names, x, y, scalar):
    """Run ``kernel`` on (x, y): (loss, o1, o2). Device inputs -> device outputs (loss a (1,)
    float64 device array); host inputs -> host outputs (loss a float)."""
    _require_cuda()
    device = is_device_array(x) or is_device_array(y)
    if device:
        d_x, d_y = _device_pair(names, x, y)
    else:
        x, y = _check_arrays(names, x, y)
        d_x, d_y = cuda.to_device(np.ascontiguousarray(x)), cuda.to_device(np.ascontiguousarray(y))
    shape, dtype, n = tuple(d_x.shape), np.dtype(d_x.dtype), d_x.shape[0]
    size = int(np.prod(shape))
    blocks = max(1, -(-size // THREADS))
    d_o1, d_o2 = cuda.device_array(shape, dtype), cuda.device_array(shape, dtype)
    d_partial = cuda.device_array(blocks, np.float64)
    d_loss = cuda.device_array(1, np.float64)
    kernel[blocks, THREADS](d_x.reshape(size), d_y.reshape(size), float(scalar), 1.0 / n,
                            d_o1.reshape(size), d_o2.reshape(size), d_partial)
    _sum_partials_kernel[1, THREADS](d_partial, 1.0 / n, d_loss)
    if device:
        return d_loss, d_o1, d_o2
    return _finite_loss(float(d_loss.copy_to_host()[0])), d_o1.copy_to_host(), d_o2.copy_to_host()


def bernoulli_eq8(a, b, m):
    """GPU ``local.bernoulli_eq8`` (Eq. 8/9 as printed): (loss, g_a, g_b).

    a, b : (N, ...) float32 / float64, both host arrays or both device arrays (module docstring).
    Host in: loss is a float, g_a and g_b NumPy arrays. Device in: all three are device arrays
    (loss of shape (1,), float64), nothing is copied to the host.
    """
    m = _check_m(m)
    return _launch(_bernoulli_eq8_kernel if cuda is not None else None, ("a", "b"), a, b, m)


def kl_ef_gradients(family, phi, gamma):
    """GPU ``local.kl_ef_gradients`` for the Gaussian family only: (loss, g_phi, g_gamma).
    Host or device arrays, as :func:`bernoulli_eq8`."""
    fam = get_family(family)
    if not isinstance(fam, Gaussian):
        raise ValueError(f"bll_ref.losses.cuda has a kernel for the Gaussian family only, got {fam!r}; "
                         f"use bll_ref.losses.kernels.kl_ef_gradients for the others")
    return _launch(_gaussian_kl_ef_kernel if cuda is not None else None, ("phi", "gamma"), phi, gamma, fam.s2)


def ef_gradients(family, phi, gamma):
    """GPU ``local.ef_gradients`` for the Gaussian family only: (g_phi, g_gamma)."""
    return kl_ef_gradients(family, phi, gamma)[1:]
