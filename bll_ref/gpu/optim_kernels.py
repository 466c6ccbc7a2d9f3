"""numba.cuda twins of the fused optimiser kernels of ``bll_ref/optim.py`` (Adam, SGD with and
without momentum), for flat contiguous device arrays; ``optim.adam_update_reference`` and
``optim.sgd_update_reference`` are their specification.

Same argument order and meaning as the CPU kernels (``_adam_kernel``, ``_sgd_kernel``,
``_sgd_plain_kernel``): the arrays are updated in place, the scalars are Python numbers that the
kernel receives in the parameters' dtype (so a float32 update runs in float32, as on the CPU).
Every array of one call must have the same size and dtype (float32 or float64) and be
C-contiguous; all CuPy (launched on CuPy's current stream, in order with the CuPy work around
it, nothing allocated, no synchronisation) or all numba device arrays (numba's default stream;
the CUDA simulator's arrays too, which is how the tests run these kernels on a CPU). No
``fastmath``: the float64 update agrees with the reference to rounding.

One thread per element over a grid of ``ceil(size / THREADS)`` blocks (at most MAX_BLOCKS;
beyond that each thread walks the array with a grid stride). The update reads and writes every
array once: Adam moves 7 words per parameter (read p, g, m, v; write p, m, v), SGD with momentum
5, plain SGD 3.

Launching (``bll_ref.gpu.launch`` says why): the kernels take raw device pointers and the
element count, are compiled once per dtype for an explicit signature and are launched through
``launch.KernelLauncher`` (``cuda.core.launch`` with a cached launch configuration and stream:
~18 us per plain-SGD call on an H200 machine, ~128 us the ordinary way). ``PTX_SIGNATURES``
lists every kernel and its signatures.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from .launch import FLOAT_KEYS, SIMULATOR, KernelLauncher, is_cupy, pointer_signatures

__all__ = ["adam", "sgd", "sgd_plain", "THREADS", "MAX_BLOCKS", "PTX_SIGNATURES"]

#: Threads per block.
THREADS = 256
#: Most blocks per launch; 65536 x 256 = 16.8M elements one per thread, larger arrays stride.
MAX_BLOCKS = 1 << 16


@cuda.jit
def _adam_kernel(p, g, m, v, n, step, beta1, one_m_beta1, beta2, one_m_beta2, inv_sqrt_c2, eps, weight_decay):
    # step = lr / c1, inv_sqrt_c2 = 1 / sqrt(c2): sqrt(v / c2) = sqrt(v) / sqrt(c2) (as optim._adam_kernel)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        pi = p[i]
        gi = g[i] + weight_decay * pi
        mi = beta1 * m[i] + one_m_beta1 * gi
        vi = beta2 * v[i] + one_m_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = pi - step * mi / (math.sqrt(vi) * inv_sqrt_c2 + eps)
        i += stride


@cuda.jit
def _sgd_kernel(p, g, velocity, n, lr, momentum, weight_decay):
    # v = momentum v + (g + wd p); p -= lr v   (PyTorch's convention, dampening 0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        pi = p[i]
        vi = momentum * velocity[i] + g[i] + weight_decay * pi
        velocity[i] = vi
        p[i] = pi - lr * vi
        i += stride


@cuda.jit
def _sgd_plain_kernel(p, g, n, lr, weight_decay):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        pi = p[i]
        p[i] = pi - lr * (g[i] + weight_decay * pi)
        i += stride


#: Every kernel of this module and the signatures it is compiled for (keys: dtype names).
PTX_SIGNATURES = {
    "_adam_kernel": pointer_signatures("dt*", "dt*", "dt*", "dt*", types.int64, *["dt"] * 8),
    "_sgd_kernel": pointer_signatures("dt*", "dt*", "dt*", types.int64, "dt", "dt", "dt"),
    "_sgd_plain_kernel": pointer_signatures("dt*", "dt*", types.int64, "dt", "dt"),
}
_LAUNCHERS = {name: KernelLauncher(globals()[name], sigs) for name, sigs in PTX_SIGNATURES.items()}


def _flat_args(who, names, arrays):
    """(kernel arguments, dtype name, size, stream, device) for same-size, same-dtype, C-contiguous
    device arrays: pointers on a GPU, flat views on the simulator."""
    p = arrays[0]
    cupy = is_cupy(p)
    dtype = np.dtype(p.dtype)
    if dtype not in FLOAT_KEYS:
        raise ValueError(f"{who} expects float32 or float64 device arrays, got {names[0]} of dtype {dtype}")
    size = p.size
    for name, a in zip(names, arrays):
        if is_cupy(a) != cupy or not (cupy or getattr(a, "__cuda_ndarray__", False)):
            raise ValueError(f"{who} expects all arrays as CuPy arrays or all as numba device arrays, "
                             f"got {names[0]} {type(p).__name__} and {name} {type(a).__name__}")
        if a.dtype != dtype or a.size != size:
            raise ValueError(f"{who}: {name} must match {names[0]} ({size} x {dtype}), "
                             f"got {a.size} x {np.dtype(a.dtype)}")
        if not (a.flags.c_contiguous if cupy else a.is_c_contiguous()):
            raise ValueError(f"{who}: {name} must be C-contiguous (the kernel reads the flat buffer)")
    if cupy:   # the arrays themselves (KernelLauncher passes their addresses), CuPy's current stream
        return list(arrays), FLOAT_KEYS[dtype], size, None, p.device.id
    if SIMULATOR:
        return [a.reshape(size) for a in arrays], FLOAT_KEYS[dtype], size, 0, 0
    return [a.__cuda_array_interface__["data"][0] for a in arrays], FLOAT_KEYS[dtype], size, 0, 0


def _launch(name, who, names, arrays, scalars):
    ptrs, key, size, stream, device = _flat_args(who, names, arrays)
    if size == 0:
        return
    grid = max(1, min(-(-size // THREADS), MAX_BLOCKS))
    _LAUNCHERS[name](key, grid, THREADS, stream, (*ptrs, size, *scalars), device)


def adam(p, g, m, v, step, beta1, one_m_beta1, beta2, one_m_beta2, inv_sqrt_c2, eps, weight_decay):
    """Adam update in place (``optim._adam_kernel`` on the device).

    p, g, m, v : flat contiguous device arrays of one size and dtype (parameters, gradient,
    first and second moments). step = lr / (1 - beta1^t), inv_sqrt_c2 = 1 / sqrt(1 - beta2^t);
    weight decay is coupled (g + wd p, as torch.optim.Adam).
    """
    _launch("_adam_kernel", "adam", ("p", "g", "m", "v"), (p, g, m, v),
            (step, beta1, one_m_beta1, beta2, one_m_beta2, inv_sqrt_c2, eps, weight_decay))


def sgd(p, g, velocity, lr, momentum, weight_decay):
    """SGD with momentum in place: v = momentum v + g + wd p; p -= lr v (``optim._sgd_kernel``)."""
    _launch("_sgd_kernel", "sgd", ("p", "g", "velocity"), (p, g, velocity), (lr, momentum, weight_decay))


def sgd_plain(p, g, lr, weight_decay):
    """Plain SGD in place: p -= lr (g + wd p) (``optim._sgd_plain_kernel``)."""
    _launch("_sgd_plain_kernel", "sgd_plain", ("p", "g"), (p, g), (lr, weight_decay))
