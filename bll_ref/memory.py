"""The memory guard: refuse, before allocating, what cannot fit in this machine's memory."""
from __future__ import annotations

import os

__all__ = ["memory_limit", "check_fits"]


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
