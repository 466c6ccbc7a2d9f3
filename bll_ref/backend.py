"""Where arrays live: NumPy on the host, CuPy on a CUDA GPU (the optional ``[cuda]`` extra).

One code path serves both: a layer, loss or optimiser asks ``array_module(x)`` for the module
that owns its input (``numpy`` or ``cupy``) and ``layers.base.kernels_for(x)`` for the kernel set that
takes it (the Numba CPU kernels of ``layers/kernels.py`` or their numba.cuda twins in
``bll_ref/gpu/layer_kernels.py``, same names and signatures). The NumPy path is the reference:
nothing here changes what it computes.

CuPy is imported lazily, on the first question about a device, so a CPU-only install never
imports it. ``DeviceError`` (a ValueError) names what is missing and what to install.
"""
from __future__ import annotations

import importlib

import numpy as np

__all__ = ["DEVICES", "DeviceError", "array_module", "is_device_array", "asnumpy", "to_device",
           "device_of", "gpu_module", "loss_kernels_gpu", "cupy_module", "require_cuda", "resolve_device",
           "synchronize", "device_info"]

#: Device names the API and ``bll-ref train --device`` take (``auto``: the GPU when one works).
DEVICES = ("cpu", "cuda", "auto")

_INSTALL = "pip install 'bll_ref[cuda]'"
_cupy = None          # the module once imported
_cupy_error = None    # why it could not be (a one-line reason)
_gpu_ok = None        # None: not asked yet; else (bool, reason)


class DeviceError(ValueError):
    """A device was asked for that this machine cannot provide (message: one line, what to do)."""


def cupy_module():
    """The ``cupy`` module, or None when it is not installed or fails to import (reason kept)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            _cupy = importlib.import_module("cupy")
        except Exception as exc:  # ImportError, or a CUDA library that fails to load
            _cupy_error = f"CuPy is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return _cupy


def _gpu_status():
    """(ok, reason): can CuPy and numba.cuda both use a GPU here? Asked once per process."""
    global _gpu_ok
    if _gpu_ok is not None:
        return _gpu_ok
    cp = cupy_module()
    if cp is None:
        _gpu_ok = (False, f"{_cupy_error}; install the GPU extra: {_INSTALL}")
        return _gpu_ok
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        _gpu_ok = (False, f"CuPy found no working CUDA driver ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); check nvidia-smi")
        return _gpu_ok
    if n < 1:
        _gpu_ok = (False, "no CUDA GPU is visible (CUDA reports 0 devices); check nvidia-smi "
                          "and CUDA_VISIBLE_DEVICES")
        return _gpu_ok
    try:
        from numba import cuda
        if not cuda.is_available():
            _gpu_ok = (False, f"numba.cuda sees no GPU (numba-cuda missing or its CUDA libraries "
                              f"not found); install the GPU extra: {_INSTALL}")
            return _gpu_ok
    except Exception as exc:
        _gpu_ok = (False, f"numba.cuda failed to import ({type(exc).__name__}); install the GPU extra: {_INSTALL}")
        return _gpu_ok
    _gpu_ok = (True, "")
    return _gpu_ok


def require_cuda():
    """The cupy module if a GPU can be used here, else DeviceError naming what is missing."""
    ok, why = _gpu_status()
    if not ok:
        raise DeviceError(f"device 'cuda' is not available: {why}")
    return _cupy


def resolve_device(device) -> str:
    """'cpu' or 'cuda' for a name in DEVICES; 'auto' is 'cuda' when a GPU works here."""
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if _gpu_status()[0] else "cpu"
    if device == "cuda":
        require_cuda()
    return device


def is_device_array(x) -> bool:
    """True for a CuPy array (the only device array type the layers take)."""
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def array_module(*xs):
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for x in xs:
            if isinstance(x, _cupy.ndarray):
                return _cupy
    return np


def device_of(x) -> str:
    """'cuda' for a CuPy array, else 'cpu'."""
    return "cuda" if is_device_array(x) else "cpu"


def asnumpy(x):
    """A host copy of a device array; anything else is returned as it is."""
    return x.get() if is_device_array(x) else x


def to_device(x, device):
    """``x`` on ``device`` ('cpu' -> NumPy, 'cuda' -> CuPy); no copy when it is already there."""
    if device == "cpu":
        return asnumpy(x)
    if device == "cuda":
        cp = require_cuda()
        return x if isinstance(x, cp.ndarray) else cp.asarray(x)
    raise DeviceError(f"device must be 'cpu' or 'cuda', got {device!r}")


def gpu_module(name):
    """``bll_ref.gpu.<name>`` (numba.cuda kernels), imported on first use: the optional GPU
    modules need numba-cuda, which a CPU install may not have."""
    return importlib.import_module(f"bll_ref.gpu.{name}")


def loss_kernels_gpu():
    """``bll_ref.losses.cuda``: the numba.cuda local-loss kernels, imported on first use."""
    return importlib.import_module("bll_ref.losses.cuda")


def synchronize():
    """Wait for the GPU (no-op without CuPy): for timings and before reading a clock."""
    if _cupy is not None:
        _cupy.cuda.get_current_stream().synchronize()


def _version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_info() -> list:
    """(item, value) rows describing the GPU stack: what was found and, for a missing piece,
    why and what to install (``bll-ref doctor`` prints them)."""
    rows = [("numpy", np.__version__)]
    nb = _version("numba")
    rows.append(("numba", nb or "missing (pip install numba)"))
    nbc = _version("numba-cuda")
    rows.append(("numba-cuda", nbc or f"missing: the GPU kernels need it ({_INSTALL})"))
    cp = cupy_module()
    cp_dist = next((d for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if _version(d)), None)
    rows.append(("CuPy", f"{cp.__version__} ({cp_dist})" if cp is not None else f"{_cupy_error}; {_INSTALL}"))
    if cp is not None:
        try:
            n = cp.cuda.runtime.getDeviceCount()
            drv = cp.cuda.runtime.driverGetVersion()
            rt = cp.cuda.runtime.runtimeGetVersion()
            rows.append(("CUDA driver", f"{drv // 1000}.{drv % 1000 // 10}"))
            rows.append(("CUDA runtime (CuPy)", f"{rt // 1000}.{rt % 1000 // 10}"))
            for i in range(n):
                p = cp.cuda.runtime.getDeviceProperties(i)
                name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
                rows.append((f"GPU {i}", f"{name}, compute capability {p['major']}.{p['minor']}, "
                                         f"{p['totalGlobalMem'] / 2**30:.0f} GiB, {p['multiProcessorCount']} SMs"))
            if n == 0:
                rows.append(("GPU", "none visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"))
        except Exception as exc:
            rows.append(("GPU", f"none usable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    ok, why = _gpu_status()
    rows.append(("--device cuda", "works" if ok else f"unavailable: {why}"))
    return rows
