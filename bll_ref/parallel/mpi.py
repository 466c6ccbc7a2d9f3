"""MPI pipeline: one rank per contiguous group of block learners (mpi4py).

Every rank builds the same model from the same seed, loads the same data and draws the same
seeded batch order, so only activations travel: rank r receives h for batch t from rank r - 1
into a preallocated buffer (buffer-based ``Recv`` of a contiguous float array, no pickling),
forwards it through its learners, sends the result on with ``Isend`` (at most two in flight),
then updates its learners. At the epoch end every rank sends its learners' state to rank 0,
which evaluates and writes the run directory exactly as a sequential run does.

Launch: ``mpiexec -n K python -m mpi4py -m bll_ref.cli train --parallel mpi`` (``-m mpi4py``
turns an uncaught exception on one rank into MPI_Abort of the whole job instead of a hang).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np

from ..methods.learner import pack_states, unpack_states
from .base import blas_threads, check_pipelinable, fault_point
from .plan import blocks_label

__all__ = ["MPIPipeline", "world", "bcast_groups", "send_arrays", "recv_arrays"]

_ACT_TAG, _STATE_TAG, _LOSS_TAG = 5, 7, 8


def world():
    """MPI.COMM_WORLD; ValueError with the install hint when mpi4py or its runtime is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--parallel mpi needs mpi4py and an MPI runtime ({e}); "
                         "pip install 'bll_ref[mpi]' and launch with mpiexec") from None
    return MPI.COMM_WORLD


def bcast_groups(comm, groups):
    """Rank 0's groups (list of lists of learner indices) to every rank, as an int array."""
    n = np.array([len(groups) if groups is not None else 0], np.int64)
    comm.Bcast(n, root=0)
    sizes = np.array([len(g) for g in groups] if comm.Get_rank() == 0 else np.zeros(n[0]), np.int64)
    comm.Bcast(sizes, root=0)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [list(range(bounds[i], bounds[i + 1])) for i in range(len(sizes))]


def send_arrays(comm, arrays: dict, dest, tag=_STATE_TAG):
    """Send a dict of arrays: a JSON header (names, dtypes, shapes) then each buffer. No pickle."""
    names = sorted(arrays)
    vals = [np.require(arrays[n], requirements="C") for n in names]  # (ascontiguousarray makes 0-d 1-d)
    header = json.dumps([[n, v.dtype.str, list(v.shape)] for n, v in zip(names, vals)]).encode()
    comm.Send(np.array([len(header)], np.int64), dest=dest, tag=tag)
    comm.Send(np.frombuffer(header, np.uint8), dest=dest, tag=tag)
    for v in vals:
        comm.Send(v.reshape(-1).view(np.uint8), dest=dest, tag=tag)


def recv_arrays(comm, source, tag=_STATE_TAG) -> dict:
    n = np.empty(1, np.int64)
    comm.Recv(n, source=source, tag=tag)
    raw = np.empty(int(n[0]), np.uint8)
    comm.Recv(raw, source=source, tag=tag)
    out = {}
    for name, dtype, shape in json.loads(raw.tobytes()):
        v = np.empty(tuple(shape), np.dtype(dtype))
        comm.Recv(v.reshape(-1).view(np.uint8), source=source, tag=tag)
        out[name] = v
    return out


class MPIPipeline:
    """This rank's part of the pipeline: ``groups[rank]`` learners of ``method``.

    ``sample_input``: a few input rows, to learn the shape of every group's input.
    """

    name = "mpi"

    def __init__(self, method, comm, groups, sample_input, blas=1):
        check_pipelinable(method)
        self.blas = blas
        self.comm, self.groups = comm, [list(g) for g in groups]
        self.rank, self.workers = comm.Get_rank(), comm.Get_size()
        if len(self.groups) != self.workers:
            raise ValueError(f"{len(self.groups)} groups of blocks for {self.workers} MPI ranks")
        self.is_root, self.last = self.rank == 0, self.rank == self.workers - 1
        self.mine = [method.learners[k] for k in self.groups[self.rank]]
        h = sample_input[:2]
        shapes = [h.shape[1:]]
        for learner in method.learners:
            h = learner.forward(h, train=False)
            shapes.append(h.shape[1:])
        self.in_shape = shapes[self.groups[self.rank][0]]
        self.dtype = h.dtype

    def label(self) -> str:
        return f"rank {self.rank} ({blocks_label(self.groups[self.rank])})"

    def run_epoch(self, method, batches, on_step):
        with blas_threads(self.blas):
            return self._run_epoch(method, batches, on_step)

    def _run_epoch(self, method, batches, on_step):
        comm, rank = self.comm, self.rank
        pending, losses = [], []
        for step, (xb, yb) in enumerate(batches, 1):
            fault_point(rank, method.epoch, step)
            Y = method.one_hot(yb)
            if rank == 0:
                h = xb
            else:
                h = np.empty((len(xb),) + tuple(self.in_shape), self.dtype)
                comm.Recv(h, source=rank - 1, tag=_ACT_TAG)
            for learner in self.mine:
                h = learner.forward(h)
            if not self.last:
                h = np.ascontiguousarray(h)
                pending.append((comm.Isend(h, dest=rank + 1, tag=_ACT_TAG), h))  # h stays alive until sent
                if len(pending) > 2:
                    pending.pop(0)[0].Wait()
            for learner in reversed(self.mine):
                learner.update(yb, Y)
            if self.last:
                losses.append(self.mine[-1].last_loss)
                on_step(step, losses[-1])
        for req, _ in pending:
            req.Wait()
        # the root reports the epoch: it needs the output learner's losses
        if self.last and not self.is_root:
            comm.Send(np.asarray(losses, np.float64), dest=0, tag=_LOSS_TAG)
        elif self.is_root and not self.last:
            losses = np.empty(step, np.float64)
            comm.Recv(losses, source=self.workers - 1, tag=_LOSS_TAG)
            losses = [float(v) for v in losses]
        return losses

    def gather(self, method):
        """Every rank's learner states to rank 0, which loads them into its copy of the model."""
        if not self.is_root:
            send_arrays(self.comm, pack_states(self.mine), dest=0)
            return
        for r in range(1, self.workers):
            for k, state in unpack_states(recv_arrays(self.comm, source=r)).items():
                method.learners[k].load_state_dict(state)

    def abort(self, error):
        """Print one line naming this worker and end the whole job (no rank is left waiting)."""
        print(f"bll-ref train: worker {self.label()} failed: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        if os.environ.get("BLL_REF_TRACEBACK"):
            traceback.print_exception(error)
        self.comm.Abort(1)
