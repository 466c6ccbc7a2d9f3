"""An exclusive lock on a run directory for the lifetime of a run (``bll-ref train``), which also
clears what a killed writer left there (``fileio.remove_leftover_temporaries``)."""
from __future__ import annotations

import contextlib
import os
import stat

from .fileio import remove_leftover_temporaries

__all__ = ["RunLock"]


class RunLock:
    """An exclusive lock on a run directory for a run's lifetime (``fcntl.flock`` on
    ``RUN_DIR/.bll-ref.lock``, which holds the holder's pid and is removed on release).

    The kernel drops the lock when its process dies, so a lock file left by a killed run does not
    block; once the lock is taken, the temporaries a killed writer left in the run directory and its
    ``state/`` are removed. Where flock is unavailable (no fcntl, a file system without locks) runs are
    not locked, and nothing is removed.
    """

    NAME = ".bll-ref.lock"

    def __init__(self):
        self.fd, self.path = None, None

    def acquire(self, run_dir):
        """Take the lock (a no-op when held); ValueError naming the holder's pid when another
        process holds it."""
        if self.fd is not None:
            return
        try:
            import fcntl
        except ImportError:
            return
        path = os.path.join(run_dir, self.NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError(f"{path} is not a regular file; remove it")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"run directory {run_dir} is in use by another bll-ref train (pid {pid}); "
                                 "wait for it to end or give another --out") from None
            except OSError:  # no locks on this file system: run unlocked
                os.close(fd)
                return
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder we waited for may have removed the file: lock the one at the path
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd, self.path = fd, path
        for d in (run_dir, os.path.join(run_dir, "state")):  # ours now: no writer can be using them
            remove_leftover_temporaries(d)

    def release(self):
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still locked, so no one locks a file about to vanish
        os.close(self.fd)
        self.fd, self.path = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
