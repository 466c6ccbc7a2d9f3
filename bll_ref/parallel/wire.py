"""Arrays between MPI ranks without pickling: a dict of arrays as a JSON header and raw buffers,
and rank 0's grouping of blocks into pipeline stages; how long a rank waits for another (the hang
deadline within an epoch, the start-up allowance). Needs only an mpi4py communicator passed in."""
from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["bcast_groups", "send_arrays", "recv_arrays", "blocking_wait", "STATE_TAG", "EPOCH_WAIT", "hang_deadline"]

STATE_TAG = 7
#: the most seconds the ranks wait for each other at start-up, while rank 0 plans and every rank loads
#: or compiles its learners' Numba kernels (``MPIPipeline._warm_up``), even while every rank beats
#: (liveness.py names a silent one within seconds); BLL_REF_MPI_START_UP overrides it
EPOCH_WAIT = float(os.environ.get("BLL_REF_MPI_START_UP", 600.0))


def hang_deadline(costs):
    """Seconds a rank waits for a neighbour inside an epoch before declaring it dead or hung:
    BLL_REF_MPI_DEADLINE if set, else 3 s plus 20 sequential steps of the measured model."""
    env = os.environ.get("BLL_REF_MPI_DEADLINE")
    return float(env) if env else 3.0 + 20 * float(sum(costs))


def bcast_groups(comm, groups, wait=None):
    """Rank 0's groups (list of lists of learner indices) to every rank, as an int array.
    ``wait(request, peer)`` completes each broadcast (default: MPI's blocking Wait)."""
    wait = wait or blocking_wait
    n = np.array([len(groups) if groups is not None else 0], np.int64)
    wait(comm.Ibcast(n, root=0), 0)
    sizes = np.array([len(g) for g in groups] if comm.Get_rank() == 0 else np.zeros(n[0]), np.int64)
    wait(comm.Ibcast(sizes, root=0), 0)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [list(range(bounds[i], bounds[i + 1])) for i in range(len(sizes))]


def blocking_wait(req, peer):
    """The default ``wait(request, peer)``: MPI's blocking Wait (no limit)."""
    req.Wait()


def send_arrays(comm, arrays: dict, dest, tag=STATE_TAG, wait=blocking_wait):
    """Send a dict of arrays: a JSON header (names, dtypes, shapes) then each buffer. No pickle.
    ``wait(request, peer)`` completes each message (default: MPI's blocking Wait). The receiver's
    dict has the sender's order (a checkpoint's entries are written in the order they arrive)."""
    names = list(arrays)
    vals = [np.require(arrays[n], requirements="C") for n in names]  # (ascontiguousarray makes 0-d 1-d)
    header = json.dumps([[n, v.dtype.str, list(v.shape)] for n, v in zip(names, vals)]).encode()
    bufs = [np.array([len(header)], np.int64), np.frombuffer(header, np.uint8)]
    for buf in bufs + [v.reshape(-1).view(np.uint8) for v in vals]:
        wait(comm.Isend(buf, dest=dest, tag=tag), dest)


def recv_arrays(comm, source, tag=STATE_TAG, wait=blocking_wait) -> dict:
    """What ``send_arrays`` sent from ``source``."""
    n = np.empty(1, np.int64)
    wait(comm.Irecv(n, source=source, tag=tag), source)
    raw = np.empty(int(n[0]), np.uint8)
    wait(comm.Irecv(raw, source=source, tag=tag), source)
    out = {}
    for name, dtype, shape in json.loads(raw.tobytes()):
        v = np.empty(tuple(shape), np.dtype(dtype))
        wait(comm.Irecv(v.reshape(-1).view(np.uint8), source=source, tag=tag), source)
        out[name] = v
    return out
