"""GPU local estimators (Eq. 7 / S8, Eq. 8/9, S12, S13) and softmax cross-entropy of the output
layer; ``local.py`` / ``output.py`` are their specification. The numba.cuda kernels themselves
live in :mod:`bll_ref.gpu.loss_kernels`; this module checks the arrays, allocates the outputs
and launches them.

Three ways to call every function, chosen by the arrays that come in:

- **CuPy arrays in** (the GPU training path): CuPy arrays out, nothing crosses to the host and
  nothing waits for the GPU. The gradients come from ``cupy.empty`` (CuPy's memory pool: no
  cudaMalloc on a pool hit), the loss is a 0-d float64 CuPy array (``float(loss)`` reads it,
  which is the only synchronisation), and the kernels run on CuPy's current stream, in order with
  the CuPy work around them (one stream per block learner works).
- **numba device arrays in** (``numba.cuda.to_device``; also any other object with
  ``__cuda_array_interface__``, read through ``numba.cuda.as_cuda_array``): numba device arrays
  out, the loss of shape (1,) float64, on numba's default stream. This is the path the CUDA
  simulator runs (``NUMBA_ENABLE_CUDASIM=1`` before numba is first imported), which is how the
  tests check the kernels' semantics on a CPU.
- **host arrays in** (NumPy): the ``local`` twins' signatures and returns (a float loss, NumPy
  gradients, ValueError on a NaN / inf loss); float32 and float64 inputs are promoted to their
  common dtype. The inputs are copied to the device and the results back.

On the device paths both inputs must be on the device, C-contiguous, of one shape and of one
float32 / float64 dtype (no device promotion), else ValueError naming the argument. A NaN or inf
among the inputs shows up as a non-finite loss (the host-side check would need a sync).

Precision: every element is computed in float64 (the loss terms are summed in float64) and the
gradients are stored in the input dtype, so float32 results are the float64 values rounded once;
they agree with ``local`` / ``kernels`` within float rounding. As in ``kernels``, Bernoulli and
Poisson gradients below the smallest normal number of their dtype are written as 0 (a subnormal
gradient makes the GEMM that consumes it many times slower); Gaussian ones are left alone.

Reduction (deterministic, no float atomics; one launch): each kernel runs a fixed grid of
``min(ceil(size / THREADS), MAX_BLOCKS)`` blocks; each block writes one float64 partial and the
last block to finish adds them in a fixed order into the loss (``bll_ref.gpu.loss_kernels`` has
the details): two runs give the same bits. The workspace (MAX_BLOCKS float64 partials and the
int32 ticket counter, 0 between launches) is cached per (device, stream) and reused; launches on
one stream run in order, so they never share it at once.

Launching: numba's ordinary ``kernel[grid, block, stream](cupy, ...)`` costs ~128 us of host
time per call (numba-cuda 0.30.4, H200 machine; ``bll_ref.gpu.launch`` says why). So the kernels
take raw device pointers (the element count passed explicitly), are compiled once per dtype for
an explicit signature, and are launched through :class:`bll_ref.gpu.launch.KernelLauncher`
(re-exported here): ~18 us per call.

Importing this module never needs a GPU (kernels compile on first use); ``PTX_SIGNATURES``
(re-exported from ``bll_ref.gpu.loss_kernels``) lists every kernel with the signatures it is
compiled for (the tests compile each to PTX).
"""
from __future__ import annotations

import sys

import numpy as np

from ..gpu.launch import FLOAT_KEYS, IMPORT_ERROR, SIMULATOR, KernelLauncher, is_cupy
from ..gpu.loss_kernels import LAUNCHERS, PTX_SIGNATURES, THREADS
from .expfam import Bernoulli, Gaussian, Poisson, get_family
from .local import _check_arrays, _check_m, _finite_loss

try:  # numba.cuda imports without a GPU or toolkit; guard anyway (stripped-down numba builds)
    from numba import cuda
except Exception:  # pragma: no cover - depends on the numba build (launch.IMPORT_ERROR says why)
    cuda = None

__all__ = ["available", "is_device_array", "bernoulli_eq8", "gaussian_s12", "poisson_s13",
           "kl_ef_gradients", "ef_gradients", "kl", "softmax_cross_entropy", "KernelLauncher",
           "THREADS", "MAX_BLOCKS", "PTX_SIGNATURES"]

#: Most blocks of a reducing kernel (the number of partial sums the last block adds); each thread then
#: walks size / (THREADS * MAX_BLOCKS) elements. 1024 x 256 threads fill an H200 (132 SMs x 2048).
MAX_BLOCKS = 1024

#: Smallest normal float per dtype: Bernoulli / Poisson gradients below it are written as 0.
_TINY = {np.dtype(np.float32): float(np.finfo(np.float32).tiny),
         np.dtype(np.float64): float(np.finfo(np.float64).tiny)}


def available() -> bool:
    """True if numba.cuda can launch kernels here (real GPU or NUMBA_ENABLE_CUDASIM=1)."""
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - driver errors
        return False


def is_device_array(x) -> bool:
    """True for a CuPy array, a numba device array (also the simulator's) or anything with
    ``__cuda_array_interface__`` (PyTorch CUDA tensors, ...)."""
    return (is_cupy(x) or bool(getattr(x, "__cuda_ndarray__", False))
            or hasattr(x, "__cuda_array_interface__"))


def _grid(size, max_blocks):
    return max(1, min(-(-size // THREADS), max_blocks))


# ------------------------------------------------------------------------------ array plumbing
def _require_cuda():
    if not available():
        why = f"numba.cuda failed to import: {IMPORT_ERROR}" if cuda is None else "no CUDA GPU found"
        raise RuntimeError(f"bll_ref.losses.cuda needs a CUDA GPU ({why}); use bll_ref.losses.kernels "
                           f"on the CPU, or set NUMBA_ENABLE_CUDASIM=1 before importing numba to simulate")


def _check_device(x, name, dtypes=(np.float32, np.float64), what="float32 or float64"):
    """Validate a device array's dtype, (N, ...) shape and C order (the kernels index the flat
    buffer). Works for CuPy and numba arrays alike."""
    dtype = np.dtype(x.dtype)
    if dtype not in dtypes:
        raise ValueError(f"{name} must be a {what} device array, got dtype {dtype}")
    if len(x.shape) < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with a batch of N >= 1 first, got {tuple(x.shape)}")
    contiguous = x.flags.c_contiguous if is_cupy(x) else x.is_c_contiguous()
    if not contiguous:
        raise ValueError(f"{name} must be a C-contiguous device array (the kernels read the flat "
                         f"buffer), got shape {tuple(x.shape)} with strides {tuple(x.strides)}; pass a "
                         f"contiguous copy (e.g. cupy.ascontiguousarray)")
    return x


def _as_numba(x):
    """A numba device array for a device input that is not CuPy (a view: no copy)."""
    return x if getattr(x, "__cuda_ndarray__", False) else cuda.as_cuda_array(x)


def _device_pair(names, x, y):
    """Both inputs as validated device arrays (both CuPy, or both numba) of one shape and dtype."""
    on_dev = (is_device_array(x), is_device_array(y))
    if on_dev[0] != on_dev[1]:
        dev, host = (names[0], names[1]) if on_dev[0] else (names[1], names[0])
        raise ValueError(f"{dev} is a device array but {host} is not: pass both on the device "
                         f"(cupy.asarray({host})) or both on the host")
    if is_cupy(x) != is_cupy(y):
        raise ValueError(f"{names[0]} and {names[1]} must both be CuPy arrays or both numba device arrays, "
                         f"got {type(x).__name__} and {type(y).__name__}")
    if not is_cupy(x):
        x, y = _as_numba(x), _as_numba(y)
    dx, dy = _check_device(x, names[0]), _check_device(y, names[1])
    if tuple(dx.shape) != tuple(dy.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (N, ...), "
                         f"got {tuple(dx.shape)} and {tuple(dy.shape)}")
    if np.dtype(dx.dtype) != np.dtype(dy.dtype):
        raise ValueError(f"{names[0]} and {names[1]} must have the same dtype on the device (there is "
                         f"no device promotion), got {np.dtype(dx.dtype)} and {np.dtype(dy.dtype)}")
    return dx, dy


_workspaces = {}


class _Cupy:
    """CuPy arrays: outputs from the pool, launch on the current stream, cached workspace."""

    launch_stream = None   # KernelLauncher: CuPy's current stream

    def __init__(self, like):
        self.cp = cp = sys.modules["cupy"]
        self.stream = cp.cuda.get_current_stream().ptr
        self.device = like.device.id

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype)

    def loss(self):
        return self.cp.empty((), np.float64)

    def workspace(self):
        """(partials, counter) of this device and stream: the counter is zeroed once, here, and
        each launch's last block sets it back to 0."""
        key = (self.device, self.stream)
        w = _workspaces.get(key)
        if w is None:
            w = _workspaces[key] = (self.cp.empty(MAX_BLOCKS, np.float64), self.cp.zeros(1, np.int32))
        return w

    @staticmethod
    def arg(x):
        return x


class _Numba:
    """numba device arrays (and the simulator's): default stream, outputs allocated per call."""
    launch_stream = 0
    device = 0

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype)

    def loss(self):
        return cuda.device_array(1, np.float64)

    def workspace(self):
        return cuda.device_array(MAX_BLOCKS, np.float64), cuda.to_device(np.zeros(1, np.int32))

    @staticmethod
    def arg(x):
        if SIMULATOR:
            return x.reshape(x.size)
        return x.__cuda_array_interface__["data"][0]


def _reduce(arrays, launcher, key, grid, args):
    """Launch a reducing kernel (``args`` up to the workspace; its last block writes the loss);
    return the loss array."""
    (partial, counter), loss = arrays.workspace(), arrays.loss()
    launcher(key, grid, THREADS, arrays.launch_stream,
             args + (arrays.arg(partial), arrays.arg(counter), arrays.arg(loss)), arrays.device)
    return loss


def _elementwise(kernel_name, names, x, y, m, p):
    """Run an elementwise loss kernel on (x, y): (loss, o1, o2) on the path of the inputs."""
    _require_cuda()
    host = not (is_device_array(x) or is_device_array(y))
    if host:
        x, y = _check_arrays(names, x, y)
        x, y = cuda.to_device(np.ascontiguousarray(x)), cuda.to_device(np.ascontiguousarray(y))
    else:
        x, y = _device_pair(names, x, y)
    arrays = _Cupy(x) if is_cupy(x) else _Numba()
    dtype = np.dtype(x.dtype)
    shape, size, n = tuple(x.shape), int(x.size), int(x.shape[0])
    t = dtype.type   # m, s2, eta_max rounded to the input dtype, as local.py uses them
    o1, o2 = arrays.empty(shape, dtype), arrays.empty(shape, dtype)
    grid = _grid(size, MAX_BLOCKS)
    args = (arrays.arg(x), arrays.arg(y), float(t(m)), float(t(p)), 1.0 / n, _TINY[dtype], size,
            arrays.arg(o1), arrays.arg(o2))
    loss = _reduce(arrays, LAUNCHERS[kernel_name], FLOAT_KEYS[dtype], grid, args)
    if host:
        return _finite_loss(float(loss.copy_to_host()[0])), o1.copy_to_host(), o2.copy_to_host()
    return loss, o1, o2


# ------------------------------------------------------------------------------- public API
_KL_EF = {Bernoulli: "_bernoulli_kl_ef_kernel", Gaussian: "_gaussian_kl_ef_kernel",
          Poisson: "_poisson_kl_ef_kernel"}


def _family_param(fam) -> float:
    return float(fam.s2) if isinstance(fam, Gaussian) else float(getattr(fam, "eta_max", 0.0))


def kl_ef_gradients(family, phi, gamma):
    """GPU ``local.kl_ef_gradients`` (Eq. S7 and Eq. 7 / S8): (loss, g_phi, g_gamma).

    family : "bernoulli", "gaussian", "poisson" or an ``expfam`` instance.
    phi, gamma : (N, ...) float32 / float64, both CuPy, both numba device arrays, or both host.
    Returns the loss (0-d float64 CuPy array / (1,) numba array / float) and the gradients
    (carrying the 1/N) like the inputs; see the module docstring.
    """
    fam = get_family(family)
    return _elementwise(_KL_EF[type(fam)], ("phi", "gamma"), phi, gamma, 0.0, _family_param(fam))


def ef_gradients(family, phi, gamma):
    """GPU ``local.ef_gradients``: (g_phi, g_gamma)."""
    return kl_ef_gradients(family, phi, gamma)[1:]


def kl(family, phi, gamma):
    """GPU ``local.kl``: the loss of :func:`kl_ef_gradients` alone."""
    return kl_ef_gradients(family, phi, gamma)[0]


def bernoulli_eq8(a, b, m):
    """GPU ``local.bernoulli_eq8`` (Eq. 8/9 as printed): (loss, g_a, g_b).

    a, b : (N, ...) float32 / float64 on one path (module docstring); m : mixing in [0, 1].
    """
    m = _check_m(m)
    return _elementwise("_bernoulli_eq8_kernel", ("a", "b"), a, b, m, 0.0)


def gaussian_s12(a, b, m, s2=1.0):
    """GPU ``local.gaussian_s12`` (Eq. S11/S12 in Eq. 8 form): (loss, g_a, g_b)."""
    m = _check_m(m)
    return _elementwise("_gaussian_s12_kernel", ("a", "b"), a, b, m, Gaussian(s2).s2)


def poisson_s13(a, b, m):
    """GPU ``local.poisson_s13`` (Eq. S13 in Eq. 8 form, eta clipped at 80): (loss, g_a, g_b)."""
    m = _check_m(m)
    return _elementwise("_poisson_s13_kernel", ("a", "b"), a, b, m, Poisson().eta_max)


def softmax_cross_entropy(logits, labels):
    """GPU ``output.softmax_cross_entropy`` for integer labels: (loss, dlogits).

    logits : (N, C) float32 / float64; labels : (N,) int32 / int64, on the same path (CuPy,
    numba device arrays or host). dlogits = (softmax(logits) - onehot(labels)) / N in the
    logits' dtype; loss = mean -log softmax[label] (0-d float64 CuPy array / (1,) numba array /
    float, like :func:`kl_ef_gradients`). Computed in float64 with the shift by the row max (finite
    for logits of 1e4). On the device a label outside [0, C) cannot raise: it makes the loss and
    its row of dlogits NaN; the host path checks the range first.
    """
    _require_cuda()
    host = not (is_device_array(logits) or is_device_array(labels))
    if host:
        z, y = np.asarray(logits), np.asarray(labels)
        if z.dtype not in (np.float32, np.float64) or z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
            raise ValueError(f"softmax_cross_entropy expects logits (N, C) float32 or float64 with N, C >= 1, "
                             f"got {z.shape} {z.dtype}")
        if y.shape != z.shape[:1] or y.dtype not in (np.int32, np.int64):
            raise ValueError(f"softmax_cross_entropy expects int32 or int64 labels of shape {z.shape[:1]}, "
                             f"got {y.shape} {y.dtype}")
        if y.min() < 0 or y.max() >= z.shape[1]:
            raise ValueError(f"softmax_cross_entropy: labels must lie in [0, {z.shape[1]}), "
                             f"got range [{y.min()}, {y.max()}]")
        z, y = cuda.to_device(np.ascontiguousarray(z)), cuda.to_device(np.ascontiguousarray(y))
    else:
        if not (is_device_array(logits) and is_device_array(labels)) or is_cupy(logits) != is_cupy(labels):
            raise ValueError(f"softmax_cross_entropy needs logits and labels on the same path (both CuPy, "
                             f"both numba device arrays or both host), got {type(logits).__name__} and "
                             f"{type(labels).__name__}")
        z, y = (logits, labels) if is_cupy(logits) else (_as_numba(logits), _as_numba(labels))
        _check_device(z, "logits")
        _check_device(y, "labels", (np.int32, np.int64), "int32 or int64")
        if len(z.shape) != 2 or z.shape[1] < 1 or tuple(y.shape) != tuple(z.shape[:1]):
            raise ValueError(f"softmax_cross_entropy expects logits (N, C) and labels (N,), "
                             f"got {tuple(z.shape)} and {tuple(y.shape)}")
    arrays = _Cupy(z) if is_cupy(z) else _Numba()
    dtype = np.dtype(z.dtype)
    n, c = int(z.shape[0]), int(z.shape[1])
    dz = arrays.empty((n, c), dtype)
    grid = _grid(n, MAX_BLOCKS)
    key = f"{dtype.name}_{np.dtype(y.dtype).name}"
    args = (arrays.arg(z), arrays.arg(y), n, c, 1.0 / n, arrays.arg(dz))
    loss = _reduce(arrays, LAUNCHERS["_softmax_ce_kernel"], key, grid, args)
    if host:
        return float(loss.copy_to_host()[0]), dz.copy_to_host()
    return loss, dz
