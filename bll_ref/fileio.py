"""The one way bll_ref writes files: through a temporary file beside the target + ``os.replace``.

An interrupted or failed write leaves the old file (or none), never half a file; the temporary
file is removed on every error, KeyboardInterrupt included. Also the one JSON encoder.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import zipfile

import numpy as np

__all__ = ["atomic_path", "atomic_open", "write_json_atomic", "write_npz", "to_json", "json_default",
           "sigterm_as_exit"]


@contextlib.contextmanager
def atomic_path(path, *, fsync=False):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Use it for writers that want a file name (h5py, np.savez); ``fsync=True`` flushes the data to
    disk before the rename (for exports a toolchain will read after a power cut).
    """
    path = os.fspath(path)
    d, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(d):
        why = "is not a directory" if os.path.exists(d) else "does not exist"
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: {d} {why}", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: a directory is in the way", path)
    tmp = os.path.join(d, f".{name}.tmp{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (tmp, None):  # name the file the user asked for, not our temporary one
            raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}", path) from None
        raise
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


# A fixed time stamp for every zip entry, so equal arrays give equal bytes (np.savez stamps the
# current time, which made two identical runs' checkpoints differ).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_npz(path, arrays, *, fsync=False):
    """``np.savez(path, **arrays)`` written atomically and reproducibly (fixed zip time stamps,
    entries in the given order); arrays are stored with ``allow_pickle=False``. Returns ``path``."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
                info.external_attr = 0o600 << 16
                with zf.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)
    return os.fspath(path)


@contextlib.contextmanager
def sigterm_as_exit():
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread instead of killing
    the process on the spot, so every ``atomic_path`` removes its temporary file on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
