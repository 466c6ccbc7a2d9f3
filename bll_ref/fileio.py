"""The one way bll_ref writes files: through a temporary file beside the target + ``os.replace``.

An interrupted or failed write leaves the old file (or none), never half a file; the temporary
file is removed on every error, KeyboardInterrupt included. Also the one JSON encoder, the
run-directory lock and the signal handling of the command line.

Targets: an output that exists must be a regular file. A device node, FIFO, socket or directory at
the output path is refused before anything is written (renaming over it would replace, as root,
e.g. the system's ``/dev/null``). A symlink is followed: the file it points to is replaced (the
link keeps pointing at the new contents), so the same rule applies to what the link points at;
a dangling link creates the file it names.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import stat
import sys
import threading
import zipfile

import numpy as np

from .memory import check_fits

__all__ = ["atomic_path", "atomic_open", "write_json_atomic", "write_npz", "to_json", "json_default",
           "sigterm_as_exit", "check_output", "signalled", "raise_if_signalled", "regular_input",
           "npz_entries", "MAX_INFLATION", "creatable_dir_problem", "remove_partial_files",
           "remove_leftover_temporaries"]

def creatable_dir_problem(path):
    """Why directory ``path`` cannot be created or written (its nearest existing ancestor is a
    file, or not writable), or None; it creates nothing. Asked before a command does its work."""
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _target(path):
    """(the file a write of ``path`` replaces, its os.stat or None): symlinks resolved; OSError when
    that is not a regular file or its directory is missing."""
    real = os.path.realpath(path)
    d = os.path.dirname(real)
    if not os.path.isdir(d):
        why = "is not a directory" if os.path.exists(d) else "does not exist"
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: {d} {why}", path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real, None
    _refuse_special(path, real, st)
    return real, st


def _refuse_special(path, real, st):
    via = f" ({real}, through a symlink)" if os.path.abspath(path) != real else ""
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}{via}: a directory is in the way; "
                                "give a file name", path)
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
        raise FileExistsError(errno.EEXIST, f"cannot write {path}{via}: it is {kind}, not a regular "
                              "file; give another output path", path)


def check_output(path, inputs=()):
    """Refuse now, before any work, an output that :func:`atomic_path` would refuse (its directory
    missing; a directory, device, FIFO or socket in the way) or that is one of ``inputs`` (the same
    file by name, through symlinks or as a hard link): ValueError / OSError naming the path."""
    real, st = _target(path)
    for src in inputs:
        same = os.path.realpath(src) == real
        if not same and st is not None:
            try:
                s2 = os.stat(src)
                same = (s2.st_dev, s2.st_ino) == (st.st_dev, st.st_ino)
            except OSError:
                pass
        if same:
            raise ValueError(f"output {os.fspath(path)} is the input file {os.fspath(src)}; choose "
                             "another output path")
    return real


@contextlib.contextmanager
def atomic_path(path, *, fsync=False):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Use it for writers that want a file name (h5py, np.savez); ``fsync=True`` flushes the data to
    disk before the rename (for exports a toolchain will read after a power cut). An existing
    ``path`` must be a regular file (or a symlink to one, whose target is replaced): anything else
    is refused before a byte is written (module docstring).
    """
    path = os.fspath(path)
    real, _ = _target(path)
    d, name = os.path.split(real)
    tmp = os.path.join(d, f".{name}.tmp{os.getpid()}")
    if os.path.lexists(tmp) and not os.path.isdir(tmp):
        os.remove(tmp)  # a leftover of a dead process with our pid (or a FIFO that open would block on)
    _PARTIAL.add(tmp)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        raise_if_signalled()  # a signal swallowed by a library's cleanup still stops the write
        try:  # again at the last moment: something may have been put there while we wrote
            _refuse_special(path, real, os.stat(real))
        except FileNotFoundError:
            pass
        os.replace(tmp, real)
    except OSError as e:
        if e.filename in (tmp, None):  # name the file the user asked for, not our temporary one
            code, why = _reason(e, tmp, path)
            raise type(e)(code, f"cannot write {path}: {why}", path) from None
        raise
    finally:
        _PARTIAL.discard(tmp)
        if os.path.exists(tmp):
            os.remove(tmp)


# Temporaries of atomic_path being written now, for remove_partial_files (a process about to end
# without unwinding: an MPI rank that aborts the job while it writes what other ranks send).
_PARTIAL = set()
_TEMPORARY = re.compile(r"\..+\.tmp[0-9]+\Z")


def remove_partial_files():
    """Remove the temporaries of the files this process is writing (best effort, no errors)."""
    for tmp in list(_PARTIAL):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def remove_leftover_temporaries(directory):
    """Remove ``.NAME.tmpPID`` regular files (``atomic_path``'s temporaries) in ``directory``, left
    by a writer that was killed; only for a directory no other writer can be using (``runlock.RunLock``)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)


def _reason(e, tmp, path):
    """(errno, one line) of a failed write: HDF5's errors carry the errno only in their text
    ("... errno = 28, error message = 'No space left on device', ...", over several lines and
    naming our temporary file); say the errno's own words instead."""
    code = e.errno
    if not isinstance(code, int) or code <= 0:
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m and int(m.group(1)) > 0 else None
    if code is not None:
        return code, os.strerror(code)
    lines = (e.strerror or str(e)).replace(tmp, path).strip().splitlines()
    return None, lines[0] if lines else type(e).__name__


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
    entries in the given order); arrays are stored with ``allow_pickle=False``. Returns ``path``.

    ``arrays``: a dict, or an iterable of (name, array) pairs, consumed one at a time (an MPI rank 0
    writes a checkpoint as the other ranks' arrays arrive, never holding them all). If it raises,
    nothing appears at ``path``."""
    pairs = arrays.items() if isinstance(arrays, dict) else arrays
    with atomic_open(path, "wb", fsync=fsync) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in pairs:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
                info.external_attr = 0o600 << 16
                with zf.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)
    return os.fspath(path)


# Signals received inside sigterm_as_exit. Process-wide by nature: a handler's exception can be
# swallowed (raised inside h5py's or a finaliser's cleanup, it is only printed as "Exception
# ignored"), so atomic_path and the command line also look here before they publish or succeed.
_SIGNALLED = []
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def signalled():
    """The first signal received inside :func:`sigterm_as_exit` (SIGINT included), or None."""
    return _SIGNALLED[0] if _SIGNALLED else None


def raise_if_signalled():
    sig = signalled()
    if sig == signal.SIGINT:
        raise KeyboardInterrupt
    if sig is not None:
        raise SystemExit(128 + sig)


@contextlib.contextmanager
def sigterm_as_exit():
    """While the block runs, SIGTERM (and SIGHUP) raise SystemExit(128 + signal) in the main thread
    instead of killing the process on the spot, so every ``atomic_path`` removes its temporary file
    on the way out; SIGINT raises KeyboardInterrupt as usual. Every signal is also recorded
    (:func:`signalled`): once one arrived, no ``atomic_path`` publishes its file, even when the
    exception was swallowed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    del _SIGNALLED[:]

    def _exit(signum, frame):
        _SIGNALLED.append(signum)
        raise SystemExit(128 + signum)

    def _interrupt(signum, frame):
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt

    hook = sys.unraisablehook

    def _quiet(u):  # our exit, swallowed in a finaliser: recorded above, not a traceback to print
        if not (_SIGNALLED and isinstance(u.exc_value, (SystemExit, KeyboardInterrupt))):
            hook(u)

    old = {s: signal.signal(s, _exit) for s in _SIGNALS}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    sys.unraisablehook = _quiet
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, h in old.items():
            signal.signal(s, h)


# A zip entry that inflates more than this (and to more than 64 MiB) is refused before it is read:
# bll_ref writes .npz files uncompressed; deflate's ratio on real weights is near 1, while a few MB
# of zeros can declare GiBs (a zip bomb).
MAX_INFLATION, _INFLATION_FLOOR = 100, 1 << 26


def regular_input(path, what="file"):
    """``path`` (str) when it is a regular file (or a link to one). A FIFO, pipe, socket or device is
    refused by name before it is opened: reading one blocks (``eval`` on a FIFO hung) or cannot
    seek (a pipe read as a zip is "not a zip archive"); ValueError / FileNotFoundError."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{path}: no such {what}", path) from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a pipe or FIFO" if stat.S_ISFIFO(st.st_mode) else \
            next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
        raise ValueError(f"{path} is {kind}, not a regular file; the {what} must be a file on disk "
                         "(save it to one first)")
    return path


def npz_entries(path):
    """name (without ``.npy``) -> (shape, dtype) of every entry of an ``.npz``, read from the zip
    directory and the ``.npy`` headers only: no array data is read, so sizes can be checked before
    anything is allocated. ValueError (naming the file and the entry) for an entry that is not a
    ``.npy``, uses a compression this Python cannot read, is encrypted, or inflates more than
    ``MAX_INFLATION`` times to over 64 MiB; the zip module's own errors (BadZipFile, EOFError,
    OSError) pass through for a damaged archive."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                raise ValueError(f"{path}: entry {name!r} is not a .npy array")
            if info.file_size > _INFLATION_FLOOR and info.file_size > MAX_INFLATION * max(1, info.compress_size):
                raise ValueError(f"{path}: entry {name!r} inflates from {info.compress_size:,} to "
                                 f"{info.file_size:,} bytes (a zip bomb?); refused before reading")
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
            except NotImplementedError as e:  # zipfile: "That compression method is not supported"
                raise ValueError(f"{path}: entry {name!r} uses zip compression method {info.compress_type}, "
                                 f"which this Python cannot read ({e}); bll_ref writes uncompressed "
                                 ".npz files") from None
            except RuntimeError as e:  # zipfile: encrypted entry ("password required")
                raise ValueError(f"{path}: entry {name!r} cannot be read ({e})") from None
            n = math.prod(shape) * dtype.itemsize
            check_fits(n, f"{path}: entry {name!r} of shape {tuple(shape)} {dtype}")
            if info.file_size < n:  # the .npy header promises more than the entry holds
                raise ValueError(f"{path}: entry {name!r} declares {shape} {dtype} ({n:,} bytes) but holds "
                                 f"{info.file_size:,} bytes; the file is damaged")
            out[name[:-4]] = (shape, dtype)
    return out


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
