"""A stand-in for CuPy on a machine without a GPU, so the GPU code path runs end to end in tests.

What it is: a module object that answers for ``cupy`` (``install()`` puts it in ``sys.modules``
and in ``bll_ref.backend``), whose ``ndarray`` wraps a host NumPy array. The numba.cuda kernels run
in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba.cuda is first
imported, so a test runs its script in a fresh process): ``install()`` teaches
``KernelLauncher``'s simulator path to pass a stand-in array's flat host buffer, where a GPU
launch passes the array's address.

What it checks: the rules CuPy enforces and NumPy does not, strictly (where unsure, stricter than
CuPy, so what passes here passes there):

* no implicit host <-> device conversion: ``np.asarray(device_array)`` raises TypeError, as
  CuPy's ``__array__`` does; a host ``ndarray`` mixed with a device array in a ufunc, a NumPy
  function, an index, an assignment or a module function raises TypeError (CuPy: "Unsupported
  type"); only ``asarray`` / ``array`` take host arrays (the explicit copy to the device), and
  only ``.get()`` / ``asnumpy`` give them back;
* reductions and scalar indexing return 0-d device arrays, as CuPy's do, not NumPy scalars, so
  code that needs a Python number must ask for one (``float``, ``int``, ``.item()``);
* ``isinstance(x, np.ndarray)`` is False for a device array.

What it cannot check: the real launch path (``cuda.core``), NVVM (the PTX tests do that), stream
ordering (every stream here runs at once, in order), cuBLAS/cuSOLVER rounding, speed.
"""
from __future__ import annotations

import sys
import types

import numpy as np

__all__ = ["FakeArray", "module", "install", "lock_shared_arrays"]

def _refuse(x):
    raise TypeError(f"Unsupported type {type(x)} (fakecupy: a host array met a device array; copy it "
                    f"with cupy.asarray first)")


def unwrap(x):
    """The host buffer of a device array; host ndarrays refused; sequences unwrapped element-wise."""
    if isinstance(x, FakeArray):
        return x._a
    if isinstance(x, np.ndarray):
        _refuse(x)
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: unwrap(v) for k, v in x.items()}
    return x


def wrap(r):
    """NumPy results as device arrays; NumPy scalars as 0-d device arrays (CuPy's reductions)."""
    if isinstance(r, np.ndarray):
        return FakeArray(r)
    if isinstance(r, np.generic):
        return FakeArray(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(wrap(v) for v in r)
    if isinstance(r, list):
        return [wrap(v) for v in r]
    return r


def _device_call(fn):
    def call(*args, **kwargs):
        return wrap(fn(*unwrap(args), **unwrap(kwargs)))
    call.__name__ = getattr(fn, "__name__", "call")
    return call


class _Device:
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Pointer:
    def __init__(self, a):
        self.ptr = a.ctypes.data


class FakeArray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array: a host ndarray behind CuPy's rules (see the module docstring)."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"FakeArray wraps an ndarray, got {type(a)}")
        object.__setattr__(self, "_a", a)

    # -- conversions CuPy refuses or makes explicit
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                        "construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        return np.array(self._a, order=order)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __bool__(self):
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (wrap(v) for v in self._a)

    def __repr__(self):
        return f"fakecupy.{np.array_repr(self._a)}"

    # -- the NumPy protocols, strict about host arrays
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return wrap(getattr(ufunc, method)(*unwrap(inputs), **unwrap(kwargs)))

    def __array_function__(self, func, types_, args, kwargs):
        return wrap(func(*unwrap(args), **unwrap(kwargs)))

    def __getitem__(self, key):
        return wrap(self._a[unwrap(key)])

    def __setitem__(self, key, value):
        self._a[unwrap(key)] = unwrap(value)

    # -- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: FakeArray(self._a.T))
    device = property(lambda self: _Device())
    data = property(lambda self: _Pointer(self._a))

    def __getattr__(self, name):
        if name.startswith("__"):       # no __array_interface__, __array_struct__, buffer: host-only doors
            raise AttributeError(name)
        attr = getattr(self._a, name)   # methods (sum, reshape, astype, ...) on the device
        return _device_call(attr) if callable(attr) else wrap(attr)

    def __setattr__(self, name, value):
        if name == "shape":
            self._a.shape = value
        else:
            raise AttributeError(f"cannot set {name} on a device array")


class _Stream:
    """A stream that runs everything at once, in order; a context manager like CuPy's."""
    _stack = []

    def __init__(self, non_blocking=False, null=False, ptr=0):
        self.ptr = ptr if null else id(self)

    def __enter__(self):
        _Stream._stack.append(self)
        return self

    def __exit__(self, *exc):
        _Stream._stack.pop()
        return False

    def synchronize(self):
        pass

    def wait_event(self, event):
        if not isinstance(event, _Event):
            raise TypeError(f"wait_event takes an Event, got {type(event)}")

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event


class _Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        pass


_NULL = _Stream(null=True)


def _get_current_stream(device_id=-1):
    return _Stream._stack[-1] if _Stream._stack else _NULL


def _runtime():
    rt = types.SimpleNamespace()
    rt.getDeviceCount = lambda: 1
    rt.driverGetVersion = lambda: 13000
    rt.runtimeGetVersion = lambda: 13000
    rt.deviceSynchronize = lambda: None
    rt.getDeviceProperties = lambda i: {"name": b"fakecupy (host memory, numba CUDA simulator)",
                                        "major": 9, "minor": 0, "totalGlobalMem": 2 ** 34,
                                        "multiProcessorCount": 1}
    return rt


def _asarray(a, dtype=None, order=None, copy=None, blocking=False):
    if isinstance(a, FakeArray):
        out = a._a if dtype is None or a.dtype == dtype else a._a.astype(dtype)
        return FakeArray(out.copy() if copy else out)
    return FakeArray(np.array(a, dtype=dtype, order=order or "K", copy=True))


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    return a.get() if isinstance(a, FakeArray) else np.asarray(a, order=order)


class _Module(types.ModuleType):
    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc) or (callable(attr) and not isinstance(attr, type)):
            fn = _device_call(attr)
            setattr(self, name, fn)
            return fn
        return attr


def module():
    """A fresh ``cupy`` stand-in."""
    m = _Module("cupy", "fakecupy: CuPy's rules on host memory (tests only)")
    m.__version__ = "0.0 (fakecupy)"
    m.ndarray = FakeArray
    m.asarray = m.array = _asarray
    m.asnumpy = _asnumpy
    m.get_array_module = lambda *xs: m if any(isinstance(x, FakeArray) for x in xs) else np
    m.linalg = types.SimpleNamespace(**{n: _device_call(getattr(np.linalg, n))
                                        for n in ("inv", "solve", "cholesky", "norm", "eigh", "qr", "svd")})
    m.cuda = types.SimpleNamespace(Stream=_Stream, Event=_Event, get_current_stream=_get_current_stream,
                                   Device=lambda i=0: _Device(), runtime=_runtime(),
                                   function=types.SimpleNamespace())
    return m


def lock_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` thread-safe (idempotent).

    numba-cuda 0.30.4's ``FakeCUDAShared.array`` looks an allocation up by call site and creates it
    when missing, without a lock: two of a block's threads (Python threads in the simulator) can
    each create one, and the thread holding the lost copy sums into it, so a block reduction came
    out different from run to run (about 1 run in 10 of test_gpu_layer_kernels). This is the same
    lookup under a lock; the call site is still the frame that called ``cuda.shared.array``.
    """
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi
    unlocked = kernelapi.FakeCUDAShared.array
    if getattr(unlocked, "locked", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:     # dynamic shared memory (no lookup), or the error
            return unlocked(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    array.locked = True
    kernelapi.FakeCUDAShared.array = array


def install(threads=8, max_blocks=4, switch_interval=5e-5):
    """Answer for CuPy in this process: ``sys.modules['cupy']``, ``bll_ref.backend``'s module and
    GPU status, and the kernel launcher's simulator path (a stand-in array -> its flat host
    buffer). numba.cuda must already be the simulator. Returns the module.

    ``threads`` per block and at most ``max_blocks`` blocks per launch (the kernels grid-stride
    over the rest): the simulator runs every CUDA thread as a Python thread, and a block's barriers
    cost it milliseconds, so the GPU's 256 x thousands would take minutes per training step. The
    kernels are written for any power-of-two block size; the sums then add in another order.
    The simulator's block waits for its threads by polling them, holding the interpreter lock for
    Python's switch interval (5 ms by default) at a time: a shorter ``switch_interval`` (seconds)
    hands the lock back to the threads sooner."""
    import numba
    if not numba.config.ENABLE_CUDASIM:
        raise RuntimeError("fakecupy needs numba's CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 before "
                           "numba.cuda is imported")
    sys.setswitchinterval(switch_interval)
    lock_shared_arrays()
    from bll_ref import backend
    from bll_ref.gpu import conv_kernels, launch, loss_kernels, norm_kernels, optim_kernels
    from bll_ref.losses import cuda as loss_cuda
    for mod in (conv_kernels, norm_kernels, loss_kernels, loss_cuda, optim_kernels):
        for name, value in (("THREADS", threads), ("REDUCE_THREADS", threads), ("MAX_BLOCKS", max_blocks)):
            if hasattr(mod, name):
                setattr(mod, name, value)
    m = module()
    sys.modules["cupy"] = m
    backend._cupy, backend._cupy_error, backend._gpu_ok = m, None, (True, "")
    launch._cupy_ndarray[:] = [FakeArray]
    simulate = launch.KernelLauncher._simulate

    def _simulate(self, key, grid, block, args):
        host = []
        for a in args:
            if isinstance(a, FakeArray):
                if not a._a.flags.c_contiguous:
                    raise ValueError("fakecupy: a kernel was given a strided array")
                a = a._a.reshape(a._a.size)
            host.append(a)
        simulate(self, key, grid, block, host)

    launch.KernelLauncher._simulate = _simulate
    return m
