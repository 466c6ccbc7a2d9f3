"""Launching numba.cuda kernels cheaply, from CuPy arrays or numba device arrays.

Why (numba-cuda 0.30.4's source, and ``benchmarks/cuda_kernels.py`` on an H200 machine, plain
SGD at 128 x 1024, host time per call): ``kernel[grid, block, stream](cupy, ...)`` costs
~128 us: numba types every argument in Python (a CuPy array has ``__dlpack__``, so ``typeof``
exports a DLPack capsule each time), then ``_prepare_args`` wraps each array again (a DLPack
StridedMemoryView; for a bare ``__cuda_array_interface__`` a stream synchronisation when the
interface names a stream and ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC`` is on) and a new
``LaunchConfig`` is built. Arrays wrapped once by ``cuda.as_cuda_array`` (impossible for the
fresh arrays of a training step) bring it to ~35 us, as does ``_Kernel.launch`` with addresses;
``specialize`` skips the type dispatch but not the wrapping.

So the kernels of ``bll_ref.losses.cuda`` and ``bll_ref.gpu`` take raw device pointers
(``CPointer`` parameters, element counts and dimensions passed explicitly, flat indexing), are
compiled once per key (e.g. per dtype) for an explicit signature (``dispatcher.compile``: no
dispatch per call), and :class:`KernelLauncher` calls ``cuda.core.launch`` itself with a cached
``LaunchConfig``, the kernel handle and a cached ``cuda.core.Stream`` for CuPy's stream: ~18 us
per call, ~10 of them the launch (a CuPy ElementwiseKernel takes ~9). The simulator
(``NUMBA_ENABLE_CUDASIM=1``) runs the same kernel bodies on flat numba arrays through the
ordinary ``kernel[grid, block]`` launch (a pointer indexes like a flat array).

The addresses are taken on the host (``a.data.ptr`` for CuPy: the address of the array's first
element, a view's offset included, as CuPy's own ``__cuda_array_interface__`` exports it), so
the kernels see a flat C-order buffer: :func:`array_args` checks that every array is
C-contiguous.

Importing this module never needs a GPU (kernels compile on first use).
"""
from __future__ import annotations

import ctypes
import sys
import warnings

import numpy as np

try:  # numba.cuda imports without a GPU or toolkit; guard anyway (stripped-down numba builds)
    import numba
    from numba import cuda, types
except Exception as exc:  # pragma: no cover - depends on the numba build
    cuda, types, IMPORT_ERROR = None, None, exc
    SIMULATOR = False
else:
    IMPORT_ERROR = None
    #: True when numba.cuda is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` before numba.cuda
    #: was first imported): kernels then run in Python on numba's simulated arrays.
    SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

__all__ = ["KernelLauncher", "SIMULATOR", "IMPORT_ERROR", "FLOAT_KEYS", "is_cupy", "pointer_signatures",
           "array_args", "like", "ticket", "load_cg"]

#: Launcher keys per float dtype (``dtype.name`` is a slow property).
FLOAT_KEYS = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}

_cupy_ndarray = []   # [cupy.ndarray] once CuPy is imported (a CuPy array implies it is)


def is_cupy(x) -> bool:
    """True for a CuPy array (without importing CuPy when nothing has)."""
    if not _cupy_ndarray:
        cp = sys.modules.get("cupy")
        if cp is None:
            return False
        _cupy_ndarray.append(cp.ndarray)
    return isinstance(x, _cupy_ndarray[0])


def pointer_signatures(*params):
    """``{'float32': sig, 'float64': sig}`` where the strings 'dt*' and 'dt' in params stand for
    the pointer / scalar type of that dtype."""
    out = {}
    for name, dt in (("float32", types.float32), ("float64", types.float64)):
        out[name] = tuple(types.CPointer(dt) if p == "dt*" else dt if p == "dt" else p for p in params)
    return out


def array_args(who, names, arrays):
    """(kernel arguments, stream, device) for the device arrays of one launch.

    All CuPy arrays: the arrays themselves (:class:`KernelLauncher` takes their addresses), CuPy's
    current stream (None) and the first array's device. All numba device arrays: their flat
    views on the simulator, else their addresses, the default stream (0) and device 0.
    ValueError, naming ``who`` and the argument, for a mix of the two, anything else, or an
    array that is not C-contiguous (the kernels index the flat buffer).
    """
    ref = arrays[0]
    if is_cupy(ref):
        for name, a in zip(names, arrays):
            if not is_cupy(a):
                _raise_mixed(who, names[0], ref, name, a)
            if not a.flags.c_contiguous:
                _raise_strided(who, name, a)
        return arrays, None, ref.device.id
    out = []
    for name, a in zip(names, arrays):
        if not getattr(a, "__cuda_ndarray__", False):
            _raise_mixed(who, names[0], ref, name, a)
        if not a.is_c_contiguous():
            _raise_strided(who, name, a)
        out.append(a.reshape(a.size) if SIMULATOR else a.__cuda_array_interface__["data"][0])
    return out, 0, 0


def _raise_mixed(who, name0, a0, name, a):
    raise ValueError(f"{who} expects all arrays as CuPy arrays or all as numba device arrays, "
                     f"got {name0} {type(a0).__name__} and {name} {type(a).__name__}")


def _raise_strided(who, name, a):
    raise ValueError(f"{who}: {name} must be a C-contiguous device array (the kernel reads the flat "
                     f"buffer), got shape {tuple(a.shape)} with strides {tuple(a.strides)}; pass a "
                     f"contiguous copy (e.g. cupy.ascontiguousarray)")


class KernelLauncher:
    """A ``@cuda.jit`` kernel compiled for a fixed signature per key (e.g. per dtype) and launched
    with raw device pointers: ``launcher(key, grid, block, stream, args, device)``.

    ``args`` follow the signature: for a ``CPointer`` parameter a CuPy array or an int address,
    for a scalar a Python number (on the simulator: the flat arrays themselves, and the scalars
    are converted to the parameter's NumPy type, so a float32 parameter computes in float32 as
    on a GPU). ``stream`` None means CuPy's current stream (CuPy arrays), an int a CUDA stream
    handle (0: the default stream, for numba device arrays). Each (key, device) compiles once,
    on first use.

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
        self._sim_casts = {}  # key -> per-parameter conversion on the simulator

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

    def _simulate(self, key, grid, block, args):
        casts = self._sim_casts.get(key)
        if casts is None:
            table = {types.float32: np.float32, types.float64: np.float64}
            casts = self._sim_casts[key] = [table.get(t) for t in self.signatures[key]]
        self.dispatcher[grid, block](*[a if c is None else c(a) for c, a in zip(casts, args)])

    def __call__(self, key, grid, block, stream, args, device=0):
        if SIMULATOR:
            self._simulate(key, grid, block, args)
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
    """An int address for a CuPy array (``data.ptr``: its first element, a view's offset
    included), anything else as it is."""
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


# ------------------------------------------------------------------ device helpers for pointers
# A ``CPointer`` parameter has no ``dtype`` attribute and numba's ``cuda.atomic`` takes arrays
# only, so the kernels that take pointers use these. On a GPU they are intrinsics (a cast, an
# atomic add, a load that bypasses L1: no function call, nothing that needs the driver to compile
# to PTX); on the simulator, where the kernels see flat arrays, plain Python.
if cuda is None:  # pragma: no cover - no numba.cuda
    like = ticket = load_cg = None
elif SIMULATOR:
    def like(p, v):
        """v rounded to the element type of p (``p.dtype.type(v)``)."""
        return p.dtype.type(v)

    @cuda.jit(device=True, inline="always")
    def ticket(counter):
        """counter[0] += 1 atomically; the value before."""
        return cuda.atomic.add(counter, 0, 1)

    @cuda.jit(device=True, inline="always")
    def load_cg(p, i):
        """p[i] (the simulator has no ``cuda.ldcg``)."""
        return p[i]
else:
    from numba.cuda.extending import intrinsic

    @intrinsic
    def like(typingctx, p, v):
        """v rounded to the element type of pointer p, as ``x.dtype.type(v)`` for an array."""
        if not isinstance(p, types.CPointer):
            return None
        sig = p.dtype(p, v)

        def codegen(context, builder, sig, args):
            return context.cast(builder, args[1], sig.args[1], sig.return_type)
        return sig, codegen

    @intrinsic
    def ticket(typingctx, counter):
        """counter[0] += 1 for an int32 pointer, atomically (relaxed, as CUDA's atomicAdd: fence
        around it); the value before."""
        if not (isinstance(counter, types.CPointer) and counter.dtype == types.int32):
            return None

        def codegen(context, builder, sig, args):
            one = context.get_constant(types.int32, 1)
            return builder.atomic_rmw("add", args[0], one, "monotonic")
        return types.int32(counter), codegen

    @intrinsic
    def load_cg(typingctx, p, i):
        """p[i] of a float64 pointer through L2 (``ld.global.cg``, as ``cuda.ldcg``, which is an
        overload and so needs the driver to compile): a value another block wrote in this launch,
        never a stale L1 line."""
        if not (isinstance(p, types.CPointer) and p.dtype == types.float64 and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            from llvmlite import ir
            ptr = builder.gep(args[0], [args[1]])
            load = ir.InlineAsm(ir.FunctionType(ir.DoubleType(), [ptr.type]), "ld.global.cg.f64 $0, [$1];", "=d,l")
            return builder.call(load, [ptr])
        return types.float64(p, i), codegen
