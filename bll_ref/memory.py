"""The memory guard: refuse, before allocating, what cannot fit in this machine's memory."""
from __future__ import annotations

import os
import sys

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover (Windows)
    resource = None

import numpy as np

__all__ = ["memory_limit", "check_fits", "resident_bytes", "peak_resident_bytes", "stand_in", "held_bytes"]


def memory_limit() -> int:
    """Bytes of physical memory (the most any array set may take); 1 TiB when unknown."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_fits(n_bytes, what):
    """ValueError when ``n_bytes`` exceed this machine's physical memory (refuse before allocating)."""
    limit = memory_limit()
    if n_bytes > limit:
        raise ValueError(f"{what} needs {n_bytes / 2 ** 30:,.1f} GiB, more than this machine's "
                         f"{limit / 2 ** 30:,.1f} GiB of memory")


def resident_bytes():
    """Bytes of this process's memory now resident (Linux ``/proc/self/statm``); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_resident_bytes():
    """The most bytes this process has had resident (``getrusage``'s ru_maxrss); None where unknown."""
    if resource is None:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def stand_in(shape, dtype) -> np.ndarray:
    """A read-only array of ``shape`` and ``dtype`` that holds no memory (zeros, every stride 0):
    stands in for data a process never reads, keeping its length and shape."""
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def held_bytes(a) -> int:
    """Bytes ``a`` holds: its ``nbytes``, or 0 for a stand-in (an array with a zero stride)."""
    a = np.asarray(a)
    return 0 if any(st == 0 and n > 1 for st, n in zip(a.strides, a.shape)) else int(a.nbytes)
