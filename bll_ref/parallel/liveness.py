"""Start-up beats: how MPI ranks tell, before the first step, a rank that is working from one that hangs.

Before the first step the ranks wait for each other while one of them loads data, plans (rank 0
measures the blocks) or compiles its Numba kernels, which takes from a second (a warm cache) to
minutes (an empty one). No fixed allowance fits both, so every rank runs a beat thread from the
start of the run until the ranks meet before the first step: twice a second it sends every other
rank a beat, as long as its own main thread is working (it used processor time, or moved to
another bytecode, in the last ``STILL`` seconds) or is itself waiting for the others. A rank that
waits for others takes their beats as they come; one that has heard nothing from a rank it waits
for in ``SILENCE`` seconds ends the job and names it. A rank hung in a read, a lock or a sleep is
thus named within ``STILL + SILENCE`` seconds (13 s by default) however long the others compile;
``EPOCH_WAIT`` (wire.py) stays the limit for a rank that keeps working but never arrives.

At the end (``finish``) the ranks exchange how many beats each sent each other and take the ones
still on the way, so no message is left unmatched. Needs an mpi4py communicator with
``MPI_THREAD_MULTIPLE`` (mpi4py's default): the beat thread sends while the main thread works.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import numpy as np

from .wire import EPOCH_WAIT

__all__ = ["StartUpBeats", "SILENCE", "STILL"]

_TAG = 11  # (mpi.py: 5, 8, 10; wire.STATE_TAG 7; the stages' own tags: exchange.py)
#: seconds a waiting rank allows between two beats of a rank it waits for (BLL_REF_MPI_SILENCE)
SILENCE = float(os.environ.get("BLL_REF_MPI_SILENCE", 8.0))
#: seconds of a main thread that neither uses processor time nor moves, after which it stops beating
STILL = float(os.environ.get("BLL_REF_MPI_STILL", 5.0))
_EVERY = 0.5  # seconds between two beats


def _cpu_ticks(native_id):
    """Processor time the thread ``native_id`` of this process has used, in clock ticks (Linux
    ``/proc/self/task/<id>/stat``); None where that cannot be read."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, ValueError, IndexError):
        return None


class StartUpBeats:
    """The beat thread of this rank, and the bounded waits of the start-up (``wait``)."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.sent = np.zeros(self.size, np.int64)  # beats sent to each rank
        self.heard = np.zeros(self.size, np.int64)  # beats taken from each rank
        self._last = {}  # rank: when this rank last took a beat from it
        self._main = threading.current_thread()
        self._mark, self._moved = None, time.perf_counter()  # the main thread's last sign of work, and when
        self._waiting, self._stop, self._sends = False, threading.Event(), []
        self._thread = None
        if self.size > 1:
            self._thread = threading.Thread(target=self._beat, name="bll-mpi-start-up-beats", daemon=True)
            self._thread.start()
            atexit.register(self._halt)  # before mpi4py's MPI_Finalize (registered earlier: runs later)

    def _working(self, now) -> bool:
        """Whether the main thread showed work in the last ``STILL`` s: processor time used, or a
        frame or bytecode not the one it had at the last look (a thread blocked in a read, on a
        lock or in a sleep shows neither)."""
        frame = sys._current_frames().get(self._main.ident)
        mark = (_cpu_ticks(self._main.native_id), id(frame), getattr(frame, "f_lasti", None))
        if mark != self._mark:
            self._mark, self._moved = mark, now
        return self._waiting or now - self._moved < STILL

    def _beat(self):
        one = np.ones(1, np.int64)
        while not self._stop.wait(_EVERY):
            self._sends = [r for r in self._sends if not r.Test()]
            if not self._working(time.perf_counter()):
                continue
            for peer in range(self.size):
                if peer != self.rank:
                    self._sends.append(self.comm.Isend(one, dest=peer, tag=_TAG))
                    self.sent[peer] += 1

    def _take(self, peers):
        """Take every beat that has arrived from ``peers``, noting when each was last heard."""
        buf = np.empty(1, np.int64)
        for src in peers:
            while self.comm.Iprobe(source=src, tag=_TAG):
                self.comm.Recv(buf, source=src, tag=_TAG)
                self.heard[src] += 1
                self._last[src] = time.perf_counter()

    def wait(self, req, peers, what, name=None):
        """Complete ``req`` (waiting for ``peers``: a list of ranks, or "all"), taking beats meanwhile;
        end the job when a rank waited for has not beaten for ``SILENCE`` s, or after ``EPOCH_WAIT``
        s in all. ``what``: "waiting for ...", for the message; ``name(rank)``: how to name a rank."""
        peers = [p for p in range(self.size) if p != self.rank] if peers == "all" else list(peers)
        name = name or (lambda r: f"rank {r}")
        self._waiting = True
        t0 = time.perf_counter()
        try:
            while not req.Test():
                self._take(peers)
                now = time.perf_counter()
                quiet = [p for p in peers if now - max(self._last.get(p, t0), t0) > SILENCE]
                if quiet or now - t0 > EPOCH_WAIT:
                    why = (f"{name(quiet[0])} has sent no beat for {SILENCE:.0f} s at start-up ({what}); it is hung "
                           "or dead" if quiet else f"still {what} after {EPOCH_WAIT:.0f} s at start-up, although "
                           "every rank beats; ending the job (BLL_REF_MPI_START_UP sets the limit in seconds)")
                    print(f"bll-ref train: {name(self.rank)}: {why}", file=sys.stderr, flush=True)
                    self.comm.Abort(1)
                time.sleep(0.005)
        finally:
            self._waiting = False

    def _halt(self):
        """Stop the beat thread (at the end of the start-up, or when the process exits)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def finish(self, wait):
        """End the start-up, on every rank once all have met: stop beating, tell every rank how many
        beats it was sent and take the ones still on the way. ``wait(request, peer)`` completes each
        message (the pipeline's, under its short deadline)."""
        if self._thread is None:
            return
        self._halt()
        owed = np.zeros(self.size, np.int64)
        wait(self.comm.Ialltoall(self.sent, owed), "all")
        buf = np.empty(1, np.int64)
        for src in range(self.size):
            for _ in range(int(owed[src] - self.heard[src])):
                wait(self.comm.Irecv(buf, source=src, tag=_TAG), src)
                self.heard[src] += 1
        for req in self._sends:
            wait(req, "all")
        self._sends = []
