"""numba.cuda kernels for the local estimators (Eq. 7 / S8, Eq. 8/9, S12, S13) and the softmax
cross-entropy of the output layer; ``local.py`` / ``output.py`` are their specification.

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

Reduction (deterministic, no float atomics): kernel 1 runs a fixed grid of
``min(ceil(size / THREADS), MAX_BLOCKS)`` blocks, each thread walks the array with a grid stride
and sums its loss terms, each block tree-reduces its threads' sums in shared memory and writes
one float64 partial; kernel 2 (one block) adds the <= MAX_BLOCKS partials in a fixed order and
scales by 1/N. The grid depends only on the size, so two runs give the same bits. The partial
workspace (MAX_BLOCKS float64) is cached per (device, stream) and reused.

Launch overhead (numba-cuda 0.30.4's source, and ``benchmarks/cuda_kernels.py`` on an H200
machine, plain SGD at 128 x 1024, host time per call). ``kernel[grid, block, stream](cupy, ...)``
costs ~128 us: numba types every argument in Python (a CuPy array has ``__dlpack__``, so
``typeof`` exports a DLPack capsule each time), then ``_prepare_args`` wraps each array again
(a DLPack StridedMemoryView; for a bare ``__cuda_array_interface__`` a stream synchronisation
when the interface names a stream and ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC`` is on) and a new
``LaunchConfig`` is built. Arrays wrapped once by ``cuda.as_cuda_array`` (impossible for the
fresh arrays of a training step) bring it to ~35 us, as does ``_Kernel.launch`` with addresses;
``specialize`` skips the type dispatch but not the wrapping. So the kernels here take raw device
pointers (``CPointer`` parameters, the element count passed explicitly), are compiled once per
dtype for an explicit signature (``dispatcher.compile``: no dispatch per call), and
:class:`KernelLauncher` calls ``cuda.core.launch`` itself with a cached ``LaunchConfig``, the
kernel handle and a cached ``cuda.core.Stream`` for CuPy's stream: ~18 us per call, ~10 of them
the launch (a CuPy ElementwiseKernel takes ~9). The simulator runs the same kernel bodies on numba
arrays through the ordinary ``kernel[grid, block]`` launch (a pointer indexes like a flat array).

Importing this module never needs a GPU (kernels compile on first use); ``PTX_SIGNATURES``
lists every kernel with the signatures it is compiled for (the tests compile each to PTX).
"""
from __future__ import annotations

import ctypes
import math
import sys
import warnings

import numpy as np

from .expfam import Bernoulli, Gaussian, Poisson, get_family
from .local import _check_arrays, _check_m, _finite_loss

try:  # numba.cuda imports without a GPU or toolkit; guard anyway (stripped-down numba builds)
    import numba
    from numba import cuda, types
except Exception as exc:  # pragma: no cover - depends on the numba build
    cuda, types, _IMPORT_ERROR = None, None, exc
    _SIMULATOR = False
else:
    _IMPORT_ERROR = None
    _SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

__all__ = ["available", "is_device_array", "bernoulli_eq8", "gaussian_s12", "poisson_s13",
           "kl_ef_gradients", "ef_gradients", "kl", "softmax_cross_entropy", "KernelLauncher",
           "THREADS", "MAX_BLOCKS", "PTX_SIGNATURES"]

#: Threads per block (a power of two: the shared-memory tree halves it).
THREADS = 256
#: Most blocks of a reducing kernel (the number of partial sums kernel 2 adds); each thread then
#: walks size / (THREADS * MAX_BLOCKS) elements. 1024 x 256 threads fill an H200 (132 SMs x 2048).
MAX_BLOCKS = 1024

#: Launcher keys per float dtype (``dtype.name`` is a slow property).
_DTYPE_KEY = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
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


_cupy_ndarray = []   # [cupy.ndarray] once CuPy is imported (a CuPy array implies it is)


def _is_cupy(x) -> bool:
    if not _cupy_ndarray:
        cp = sys.modules.get("cupy")
        if cp is None:
            return False
        _cupy_ndarray.append(cp.ndarray)
    return isinstance(x, _cupy_ndarray[0])


def is_device_array(x) -> bool:
    """True for a CuPy array, a numba device array (also the simulator's) or anything with
    ``__cuda_array_interface__`` (PyTorch CUDA tensors, ...)."""
    return (_is_cupy(x) or bool(getattr(x, "__cuda_ndarray__", False))
            or hasattr(x, "__cuda_array_interface__"))


# --------------------------------------------------------------------------------- launching
class KernelLauncher:
    """A ``@cuda.jit`` kernel compiled for a fixed signature per key (e.g. per dtype) and launched
    with raw device pointers: ``launcher(key, grid, block, stream, args, device)``.

    ``args`` follow the signature: for a ``CPointer`` parameter a CuPy array or an int address,
    for a scalar a Python number (on the simulator: the flat arrays themselves). ``stream`` None
    means CuPy's current stream (CuPy arrays), an int a CUDA stream handle (0: the default stream,
    for numba device arrays). Each (key, device) compiles once, on first use.

    ``path`` (class-wide; benchmarks compare them): "core" (the default) calls ``cuda.core.launch``
    with a cached LaunchConfig and stream; "numba" numba's own ``_Kernel.launch`` (per-argument
    Python and a new LaunchConfig per call: about 2x the host time on an H200 machine); "cupy"
    loads numba's cubin into CuPy and launches through CuPy's Cython ``Function`` (for stream
    None; expected cheaper than "core" but not yet measured on a GPU, hence not the default). A
    path whose numba-cuda / CuPy internals are missing falls back to "core" (with a warning),
    "core" to "numba".
    """

    path = "core"

    def __init__(self, dispatcher, signatures):
        self.dispatcher = dispatcher
        self.signatures = dict(signatures)
        self._compiled = {}   # (key, device id) -> dict(kernel=, core=, cupy=, conv_core=, conv_cupy=)

    def _compile(self, key, device):
        sig = self.signatures[key]
        kernel = self.dispatcher.compile(sig)
        kernel.bind()
        entry = {"kernel": kernel, "core": None, "cupy": None,
                 "conv_core": _converters(sig, "core"), "conv_cupy": _converters(sig, "cupy")}
        try:
            entry["core"] = kernel._codelibrary.get_cufunc().kernel
        except AttributeError:  # pragma: no cover - numba-cuda internals moved
            pass
        self._compiled[key, device] = entry
        return entry

    def _cupy_function(self, entry):
        """CuPy's Function for numba's cubin (loaded on first use), or False with a warning."""
        try:
            import cupy
            lib = entry["kernel"]._codelibrary
            image = lib.get_cubin()   # bytes, or a cuda.core ObjectCode (numba-cuda 0.30)
            image = image if isinstance(image, bytes) else bytes(image.code)
            module = cupy.cuda.function.Module()
            module.load(image)
            entry["cupy"] = (module, module.get_function(lib._entry_name))
        except Exception as exc:  # pragma: no cover - no CuPy, or numba-cuda internals moved
            warnings.warn(f"KernelLauncher: path 'cupy' unavailable for {self.dispatcher.__name__} "
                          f"({type(exc).__name__}: {exc}); launching through cuda.core", RuntimeWarning)
            entry["cupy"] = False
        return entry["cupy"]

    def __call__(self, key, grid, block, stream, args, device=0):
        if _SIMULATOR:
            self.dispatcher[grid, block](*args)
            return
        entry = self._compiled.get((key, device)) or self._compile(key, device)
        path = self.path
        if path == "cupy":
            fn = entry["cupy"] if entry["cupy"] is not None else self._cupy_function(entry)
            if fn and stream is None:
                fn[1]((grid, 1, 1), (block, 1, 1), tuple([c(a) for c, a in zip(entry["conv_cupy"], args)]))
                return
            path = "core"
        if stream is None:
            stream = sys.modules["cupy"].cuda.get_current_stream().ptr
        if path == "core" and entry["core"] is not None:
            _core_launch(_core_stream(stream), _launch_config(grid, block), entry["core"],
                         *[c(a) for c, a in zip(entry["conv_core"], args)])
            return
        entry["kernel"].launch([_address(a) for a in args], grid, block, _core_stream(stream))


def _address(a):
    """An int address for a CuPy array, anything else as it is."""
    data = getattr(a, "data", None)
    return data.ptr if data is not None and hasattr(data, "ptr") else a


def _converters(sig, path):
    """Per parameter, what turns an argument into what the launch path takes: for cuda.core the
    kernel arguments numba's ``_Kernel._prepare_args`` makes (addresses as ints, scalars as
    ctypes), for CuPy's Function CuPy arrays as they are and scalars as NumPy scalars of the
    parameter's type."""
    if path == "core":
        table = {types.float64: ctypes.c_double, types.float32: ctypes.c_float,
                 types.int64: ctypes.c_int64, types.int32: ctypes.c_int32}
        return [_address if isinstance(t, types.CPointer) else table[t] for t in sig]
    table = {types.float64: np.float64, types.float32: np.float32, types.int64: np.int64, types.int32: np.int32}
    return [_cupy_pointer if isinstance(t, types.CPointer) else table[t] for t in sig]


def _cupy_pointer(a):
    return np.uint64(a) if isinstance(a, int) else a


_core = {}


def _core_launch(*args):
    launch = _core.get("launch")
    if launch is None:
        from cuda.core import launch
        _core["launch"] = launch
    return launch(*args)


def _launch_config(grid, block, _cache={}):
    cfg = _cache.get((grid, block))
    if cfg is None:
        from cuda.core import LaunchConfig
        cfg = _cache[grid, block] = LaunchConfig(grid=grid, block=block)
    return cfg


def _core_stream(handle, _cache={}):
    """A cuda.core Stream wrapping a CUDA stream handle (not owned), cached per handle."""
    s = _cache.get(handle)
    if s is None:
        from cuda.core import Stream
        s = _cache[handle] = Stream.from_handle(int(handle))
    return s


def _grid(size, max_blocks):
    return max(1, min(-(-size // THREADS), max_blocks))


# ------------------------------------------------------------------------------------ kernels
def _pointer_signatures(*params):
    """``{'float32': sig, 'float64': sig}`` where the string 'dt' in params stands for the
    pointer / scalar type of that dtype."""
    out = {}
    for name, dt in (("float32", types.float32), ("float64", types.float64)):
        out[name] = tuple(types.CPointer(dt) if p == "dt*" else dt if p == "dt" else p for p in params)
    return out


if cuda is not None:
    _f64, _i64, _P64 = types.float64, types.int64, types.CPointer(types.float64)

    @cuda.jit(device=True, inline="always")
    def _block_reduce(term, partial):
        """Tree-reduce one float64 per thread in shared memory; thread 0 writes the block's sum
        to partial[blockIdx.x]. The block must have THREADS threads."""
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
    def _sum_partials_kernel(partial, n_partials, inv_n, loss):
        """One block of THREADS: thread t adds partial[t], partial[t + THREADS], ... in order,
        then the tree; loss[0] = the sum times inv_n (a fixed order: deterministic)."""
        t = cuda.threadIdx.x
        term = 0.0
        k = t
        while k < n_partials:
            term += partial[k]
            k += THREADS
        _block_reduce(term * inv_n, loss)

    @cuda.jit(device=True, inline="always")
    def _ftz(v, tiny):
        """v, or 0 where |v| is below the smallest normal number of the output dtype."""
        return v if abs(v) >= tiny else 0.0

    @cuda.jit(device=True, inline="always")
    def _relu(x):
        return x if x > 0.0 else 0.0  # not max(x, 0.0): NVVM rejects the builtin (numba-cuda 0.30.4)

    @cuda.jit(device=True, inline="always")
    def _sigmoid_parts(x, e):
        """(S(x), S(x) S(-x), 1 / (1 + e)) given e = e^{-|x|}: the Bernoulli mu and var (Eq. S9)."""
        r = 1.0 / (1.0 + e)
        return (1.0 if x >= 0.0 else e) * r, e * r * r, r

    @cuda.jit(device=True, inline="always")
    def _bernoulli_kl(x, g, mu_g, e_x, e_g, r_g):
        """A(x) - A(g) - mu(g) (x - g) (Eq. S7); the softplus difference in one log1p:
        log1p(e_x) - log1p(e_g) = log1p((e_x - e_g) / (1 + e_g)), argument in [-1/2, 1]."""
        return (_relu(x) - _relu(g)) + math.log1p((e_x - e_g) * r_g) - mu_g * (x - g)

    @cuda.jit(device=True, inline="always")
    def _clip_exp(x, eta_max):
        """e^min(x, eta_max): the clipped Poisson mean (expfam.Poisson)."""
        return math.exp(x if x < eta_max else eta_max)

    # Every elementwise loss kernel: (x, y, m, p, inv_n, tiny, n, o1, o2, partial).
    # x, y: inputs (phi, gamma) or (a, b); m: mixing (Eq. 9); p: s2 (Gaussian) or eta_max
    # (Poisson); inv_n = 1/N; tiny: the flush threshold of the output dtype; n: element count;
    # o1, o2: the two gradients; partial: one float64 loss sum per block.

    @cuda.jit
    def _bernoulli_kl_ef_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            phi = numba.float64(x[k])
            gam = numba.float64(y[k])
            e_x = math.exp(-abs(phi))
            e_y = math.exp(-abs(gam))
            mu_p, var_p, r_p = _sigmoid_parts(phi, e_x)
            mu_g, var_g, r_g = _sigmoid_parts(gam, e_y)
            o1[k] = _ftz(-(mu_g - mu_p) * inv_n, tiny)          # Eq. 7 forward weight
            o2[k] = _ftz(var_g * (gam - phi) * inv_n, tiny)     # Eq. 7 posterior weight
            acc += _bernoulli_kl(phi, gam, mu_g, e_x, e_y, r_g)
            k += stride
        _block_reduce(acc, partial)

    @cuda.jit
    def _gaussian_kl_ef_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        h = 0.5 * p
        acc = 0.0
        while k < n:
            phi = numba.float64(x[k])
            gam = numba.float64(y[k])
            mu_g = p * gam
            o1[k] = -(mu_g - p * phi) * inv_n                   # Eq. 7 forward weight
            o2[k] = p * (gam - phi) * inv_n                     # Eq. 7 posterior weight
            acc += h * (phi * phi) - h * (gam * gam) - mu_g * (phi - gam)   # Eq. S7
            k += stride
        _block_reduce(acc, partial)

    @cuda.jit
    def _poisson_kl_ef_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            phi = numba.float64(x[k])
            gam = numba.float64(y[k])
            e_p = _clip_exp(phi, p)
            e_g = _clip_exp(gam, p)
            o1[k] = _ftz(-(e_g - e_p) * inv_n, tiny)
            o2[k] = _ftz(e_g * (gam - phi) * inv_n, tiny)
            acc += e_p - e_g - e_g * (phi - gam)
            k += stride
        _block_reduce(acc, partial)

    @cuda.jit
    def _bernoulli_eq8_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            a = numba.float64(x[k])
            b = numba.float64(y[k])
            g = a + m * b                                       # Eq. 9
            e_a = math.exp(-abs(a))
            e_g = math.exp(-abs(g))
            alpha, var_a, r_a = _sigmoid_parts(a, e_a)
            rho, var_g, r_g = _sigmoid_parts(g, e_g)
            post = var_g * b                                    # Eq. 8 posterior weight rho(1-rho) b
            o1[k] = _ftz((-(rho - alpha) + post) * inv_n, tiny)  # Eq. 8 forward weight (rho - alpha)
            o2[k] = _ftz(post * inv_n, tiny)
            acc += _bernoulli_kl(a, g, rho, e_a, e_g, r_g)
            k += stride
        _block_reduce(acc, partial)

    @cuda.jit
    def _gaussian_s12_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        h = 0.5 * p
        acc = 0.0
        while k < n:
            a = numba.float64(x[k])
            b = numba.float64(y[k])
            g = a + m * b
            mu_g = p * g
            post = p * b                                        # S12 posterior weight sigma^2 b
            o1[k] = (-(mu_g - p * a) + post) * inv_n            # S11 forward weight s2 (gamma - phi)
            o2[k] = post * inv_n
            acc += h * (a * a) - h * (g * g) - mu_g * (a - g)
            k += stride
        _block_reduce(acc, partial)

    @cuda.jit
    def _poisson_s13_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            a = numba.float64(x[k])
            b = numba.float64(y[k])
            g = a + m * b
            alpha = _clip_exp(a, p)
            rho = _clip_exp(g, p)
            post = rho * b                                      # S13 posterior weight rho b
            o1[k] = _ftz((-(rho - alpha) + post) * inv_n, tiny)
            o2[k] = _ftz(post * inv_n, tiny)
            acc += alpha - rho - rho * (a - g)
            k += stride
        _block_reduce(acc, partial)

    @cuda.jit
    def _softmax_ce_kernel(z, labels, n_rows, c, inv_n, dz, partial):
        """One thread per row of z (n_rows, c), grid stride: dz = (softmax - onehot) * inv_n,
        the row's -log softmax[label] summed per block. A label outside [0, c) makes its row's
        gradient and the loss NaN (a device kernel cannot raise)."""
        r = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while r < n_rows:
            base = r * c
            zmax = numba.float64(z[base])
            for j in range(1, c):
                zj = numba.float64(z[base + j])
                zmax = zj if zj > zmax else zmax
            s = 0.0
            for j in range(c):
                s += math.exp(numba.float64(z[base + j]) - zmax)
            lse = math.log(s)                                   # log-sum-exp of the shifted row
            y = numba.int64(labels[r])
            ok = y >= 0 and y < c
            for j in range(c):
                pj = math.exp((numba.float64(z[base + j]) - zmax) - lse)
                if j == y:
                    pj -= 1.0
                dz[base + j] = (pj if ok else math.nan) * inv_n
            if ok:
                acc -= (numba.float64(z[base + y]) - zmax) - lse
            else:
                acc += math.nan
            r += stride
        _block_reduce(acc, partial)

    _ELEMENTWISE_SIG = _pointer_signatures("dt*", "dt*", _f64, _f64, _f64, _f64, _i64, "dt*", "dt*", _P64)

    #: Every kernel of this module and the signatures it is compiled for (keys: dtype names;
    #: for the softmax, logits dtype + label dtype). The tests compile each to PTX.
    PTX_SIGNATURES = {
        "_bernoulli_kl_ef_kernel": _ELEMENTWISE_SIG,
        "_gaussian_kl_ef_kernel": _ELEMENTWISE_SIG,
        "_poisson_kl_ef_kernel": _ELEMENTWISE_SIG,
        "_bernoulli_eq8_kernel": _ELEMENTWISE_SIG,
        "_gaussian_s12_kernel": _ELEMENTWISE_SIG,
        "_poisson_s13_kernel": _ELEMENTWISE_SIG,
        "_sum_partials_kernel": {"float64": (_P64, _i64, _f64, _P64)},
        "_softmax_ce_kernel": {
            f"{zt}_{lt}": (types.CPointer(getattr(types, zt)), types.CPointer(getattr(types, lt)), _i64, _i64,
                           _f64, types.CPointer(getattr(types, zt)), _P64)
            for zt in ("float32", "float64") for lt in ("int32", "int64")},
    }
    _LAUNCHERS = {name: KernelLauncher(globals()[name], sigs) for name, sigs in PTX_SIGNATURES.items()}
else:  # pragma: no cover - no numba.cuda
    PTX_SIGNATURES = {}
    _LAUNCHERS = {}


# ------------------------------------------------------------------------------ array plumbing
def _require_cuda():
    if not available():
        why = f"numba.cuda failed to import: {_IMPORT_ERROR}" if cuda is None else "no CUDA GPU found"
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
    contiguous = x.flags.c_contiguous if _is_cupy(x) else x.is_c_contiguous()
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
    if _is_cupy(x) != _is_cupy(y):
        raise ValueError(f"{names[0]} and {names[1]} must both be CuPy arrays or both numba device arrays, "
                         f"got {type(x).__name__} and {type(y).__name__}")
    if not _is_cupy(x):
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

    def partial(self):
        key = (self.device, self.stream)
        w = _workspaces.get(key)
        if w is None:
            w = _workspaces[key] = self.cp.empty(MAX_BLOCKS, np.float64)
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

    def partial(self):
        return cuda.device_array(MAX_BLOCKS, np.float64)

    @staticmethod
    def arg(x):
        if _SIMULATOR:
            return x.reshape(x.size)
        return x.__cuda_array_interface__["data"][0]


def _reduce(arrays, launcher, key, grid, args, n_terms_scale):
    """Launch ``launcher`` (which writes grid partials) and the partial sum; return the loss array."""
    partial, loss = arrays.partial(), arrays.loss()
    launcher(key, grid, THREADS, arrays.launch_stream, args + (arrays.arg(partial),), arrays.device)
    _LAUNCHERS["_sum_partials_kernel"]("float64", 1, THREADS, arrays.launch_stream,
                                       (arrays.arg(partial), grid, n_terms_scale, arrays.arg(loss)),
                                       arrays.device)
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
    arrays = _Cupy(x) if _is_cupy(x) else _Numba()
    dtype = np.dtype(x.dtype)
    shape, size, n = tuple(x.shape), int(x.size), int(x.shape[0])
    t = dtype.type   # m, s2, eta_max rounded to the input dtype, as local.py uses them
    o1, o2 = arrays.empty(shape, dtype), arrays.empty(shape, dtype)
    grid = _grid(size, MAX_BLOCKS)
    args = (arrays.arg(x), arrays.arg(y), float(t(m)), float(t(p)), 1.0 / n, _TINY[dtype], size,
            arrays.arg(o1), arrays.arg(o2))
    loss = _reduce(arrays, _LAUNCHERS[kernel_name], _DTYPE_KEY[dtype], grid, args, 1.0 / n)
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
        if not (is_device_array(logits) and is_device_array(labels)) or _is_cupy(logits) != _is_cupy(labels):
            raise ValueError(f"softmax_cross_entropy needs logits and labels on the same path (both CuPy, "
                             f"both numba device arrays or both host), got {type(logits).__name__} and "
                             f"{type(labels).__name__}")
        z, y = (logits, labels) if _is_cupy(logits) else (_as_numba(logits), _as_numba(labels))
        _check_device(z, "logits")
        _check_device(y, "labels", (np.int32, np.int64), "int32 or int64")
        if len(z.shape) != 2 or z.shape[1] < 1 or tuple(y.shape) != tuple(z.shape[:1]):
            raise ValueError(f"softmax_cross_entropy expects logits (N, C) and labels (N,), "
                             f"got {tuple(z.shape)} and {tuple(y.shape)}")
    arrays = _Cupy(z) if _is_cupy(z) else _Numba()
    dtype = np.dtype(z.dtype)
    n, c = int(z.shape[0]), int(z.shape[1])
    dz = arrays.empty((n, c), dtype)
    grid = _grid(n, MAX_BLOCKS)
    key = f"{dtype.name}_{np.dtype(y.dtype).name}"
    args = (arrays.arg(z), arrays.arg(y), n, c, 1.0 / n, arrays.arg(dz))
    loss = _reduce(arrays, _LAUNCHERS["_softmax_ce_kernel"], key, grid, args, 1.0 / n)
    if host:
        return float(loss.copy_to_host()[0]), dz.copy_to_host()
    return loss, dz
