"""The one way bll_ref writes files: through a temporary file beside the target + ``os.replace``.

An interrupted or failed write leaves the old file (or none), never half a file; the temporary
file is removed on every error, KeyboardInterrupt included. Also the one JSON encoder.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np

__all__ = ["atomic_path", "atomic_open", "write_json_atomic", "to_json", "json_default"]


@contextlib.contextmanager
def atomic_path(path, *, fsync=False):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Use it for writers that want a file name (h5py, np.savez); ``fsync=True`` flushes the data to
    disk before the rename (for exports a toolchain will read after a power cut).
    """
    path = os.fspath(path)
    d, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"cannot write {path}: directory {d} does not exist")
    tmp = os.path.join(d, f".{name}.tmp{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="wb", *, fsync=False):
    """``open`` for writing whose result appears at ``path`` only when the block ends cleanly."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing ('w' modes), got mode {mode!r}")
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode) as f:
            yield f


def json_default(o):
    """JSON for NumPy scalars and arrays (``json.dumps(..., default=json_default)``)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"value of type {type(o).__name__} is not JSON-able")


def to_json(obj, **kw) -> str:
    return json.dumps(obj, default=json_default, **kw)


def write_json_atomic(path, obj, *, indent=1):
    """Write ``obj`` as JSON through a temporary file + rename."""
    with atomic_open(path, "w") as f:
        f.write(to_json(obj, indent=indent))
