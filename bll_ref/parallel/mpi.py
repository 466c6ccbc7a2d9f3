"""MPI pipeline: one stage per contiguous group of block learners, R replica ranks per stage (mpi4py).

Every rank builds the same model from the same seed, loads the same data and draws the same
seeded batch order, so only activations travel: rank r receives h for batch t from rank r - 1
into a preallocated buffer (buffer-based ``Recv`` of a contiguous float array, no pickling),
forwards it through its learners, sends the result on with ``Isend`` (at most two in flight),
then updates its learners. At the epoch end every rank sends its learners' state to rank 0,
which evaluates and writes the run directory exactly as a sequential run does.

Replicas (``--replicas R``, world = stages x R, rank = stage * R + replica): the batch is split into
``--micro-batches M`` slices (``slices.py``), replica q of a stage takes slices q M/R .. (q+1) M/R - 1
and talks only to replica q of the stages beside it. Before its optimisers step, a stage's
replicas exchange their slices' records (point-to-point, learner by learner: learner k's travel
while learner k + 1 computes, between buffers allocated at the first step that ``run_slice`` then
writes into directly) and every replica sums them in slice (= rank) order, never in the order an
``Allreduce`` picks, so all replicas make the same step, and the same one as a sequential run with
``--micro-batches M``.

Waiting is bounded: a watchdog thread watches every wait for a receive, send or exchange; a rank
that hears nothing from a neighbour for ``deadline`` seconds prints which rank and blocks it waited
for and aborts the job. Every epoch starts with rank 0 broadcasting that it is done with the last
one (evaluation, files): the others wait for that with a long allowance (``EPOCH_WAIT``, rank 0 is
alive and busy), and from then on every wait of the epoch, its first step's included, has the short
deadline. Only the first step after the ranks start (Numba kernels loaded or compiled) gets the
long allowance too.

Launch: ``mpiexec -n K python -m mpi4py -m bll_ref.cli train --parallel mpi`` (``-m mpi4py``
turns an uncaught exception on one rank into MPI_Abort of the whole job instead of a hang).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

import numpy as np

from ..methods.learner import pack_states, unpack_states
from .base import blas_threads, check_pipelinable, fault_point
from .plan import blocks_label
from .shard import release_others, state_bytes
from .slices import (combine, pack_records, record_bytes, record_layout, slice_bounds, split, stage_slices,
                     unpack_records)

__all__ = ["MPIPipeline", "world", "bcast_groups", "send_arrays", "recv_arrays", "hang_deadline", "EPOCH_WAIT"]

_ACT_TAG, _STATE_TAG, _LOSS_TAG, _GRAD_TAG = 5, 7, 8, 9
#: seconds a rank waits for rank 0 to start the next epoch (it evaluates and writes files meanwhile),
#: and for the first step after start-up (kernels loaded or compiled on every rank)
EPOCH_WAIT = 600.0


def world():
    """MPI.COMM_WORLD; ValueError with the install hint when mpi4py or its runtime is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--parallel mpi needs mpi4py and an MPI runtime ({e}); "
                         "pip install 'bll_ref[mpi]' and launch with mpiexec") from None
    return MPI.COMM_WORLD


def hang_deadline(costs):
    """Seconds a rank waits for a neighbour inside an epoch before declaring it dead or hung:
    BLL_REF_MPI_DEADLINE if set, else 3 s plus 20 sequential steps of the measured model."""
    env = os.environ.get("BLL_REF_MPI_DEADLINE")
    return float(env) if env else 3.0 + 20 * float(sum(costs))


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
    """This rank's part of the pipeline: stage ``rank // replicas`` runs ``groups[stage]`` learners
    of ``method`` on its share of every batch.

    ``sample_input``: a few input rows, to learn the shape of every group's input.
    ``deadline``: seconds to wait for a neighbour within an epoch (``hang_deadline``).
    """

    name = "mpi"

    def __init__(self, method, comm, groups, sample_input, blas=1, replicas=1, micro_batches=1, deadline=30.0,
                 log=None):
        check_pipelinable(method)
        self.log, self.held, self._watch = log, None, None
        self._xbuf, self._xraw = [], []  # per learner of the stage: replica -> records (views), -> raw buffer
        self._started = False  # the first step after start-up gets EPOCH_WAIT (kernels compiled)
        self._limit = EPOCH_WAIT
        threading.Thread(target=self._watchdog, name="bll-mpi-watchdog", daemon=True).start()
        self.blas, self.deadline = blas, float(deadline)
        self.comm, self.groups = comm, [list(g) for g in groups]
        self.rank, self.workers = comm.Get_rank(), comm.Get_size()
        self.replicas, self.micro = int(replicas), int(micro_batches)
        self.stages = self.workers // self.replicas
        if len(self.groups) != self.stages or self.stages * self.replicas != self.workers:
            raise ValueError(f"{len(self.groups)} groups of blocks x {self.replicas} replicas for {self.workers} MPI ranks")
        self.stage, self.replica = divmod(self.rank, self.replicas)
        self.share = self.micro // self.replicas
        self.stage_comm = comm.Split(self.stage, self.replica) if self.replicas > 1 else None
        self.is_root, self.last_stage = self.rank == 0, self.stage == self.stages - 1
        self.last = self.last_stage and self.replica == 0  # the rank that reports the losses
        self.mine = [method.learners[k] for k in self.groups[self.stage]]
        h = sample_input[:2]
        shapes = [h.shape[1:]]
        for learner in method.learners:
            h = learner.forward(h, train=False)
            shapes.append(h.shape[1:])
        self.in_shape = shapes[self.groups[self.stage][0]]
        self.dtype = h.dtype

    def _label_of(self, rank) -> str:
        stage, replica = divmod(rank, self.replicas)
        rep = f", replica {replica}" if self.replicas > 1 else ""
        return f"rank {rank} ({blocks_label(self.groups[stage])}{rep})"

    def label(self) -> str:
        return self._label_of(self.rank)

    def _wait(self, req, peer, step, limit=None):
        """Complete ``req`` (a message to or from rank ``peer``; None: a whole stage's collective) with
        MPI's own blocking ``Wait`` (mpi4py releases the GIL in it); the watchdog thread aborts
        the job if it blocks longer than ``limit`` (default: the current step's, ``_limit``)."""
        self._watch = (time.perf_counter(), self._limit if limit is None else limit, peer, step)
        req.Wait()
        self._watch = None

    def _start_epoch(self, epoch):
        """Rank 0 broadcasts the epoch number once it has finished the last epoch (evaluated,
        written its files); the others wait for it with ``EPOCH_WAIT``, because rank 0 is busy, not
        hung. After it every rank is inside the epoch, so every later wait gets the short deadline."""
        token = np.array([epoch], np.int64)
        self._wait(self.comm.Ibcast(token, root=0), 0, 0, limit=EPOCH_WAIT)
        if int(token[0]) != epoch:
            raise RuntimeError(f"rank 0 started epoch {int(token[0]) + 1}, {self.label()} epoch {epoch + 1}")

    def _watchdog(self):
        """Daemon thread: ends the job when the main thread has waited too long for a neighbour."""
        while True:
            time.sleep(0.2)
            w = self._watch
            if w is not None and time.perf_counter() - w[0] > w[1]:
                _, limit, peer, step = w
                who = self._label_of(peer) if peer is not None else \
                    f"the other replicas of stage {self.stage} ({blocks_label(self.groups[self.stage])})"
                when = f"at step {step}" if step else "before the epoch's first step"
                self._die(f"no message from {who} for {limit:.0f} s {when}; it is dead or hung")

    def _die(self, why):
        print(f"bll-ref train: {self.label()}: {why}", file=sys.stderr, flush=True)
        self.comm.Abort(1)

    def hold_only_mine(self, method):
        """Ranks other than 0 let go of the learners they do not train (``shard.py``); rank 0
        logs the bytes of model state every rank holds before and after. Returns this rank's
        (before, after)."""
        before = state_bytes(method.learners)
        if not self.is_root:
            release_others(method, self.groups[self.stage])
        after = state_bytes(method.learners)
        every = np.zeros((self.workers, 2), np.int64) if self.is_root else None
        self.comm.Gather(np.array([before, after], np.int64), every, root=0)
        if self.is_root and self.log:
            per = ", ".join(f"{r}: {a / 1e6:.2f}" for r, (_, a) in enumerate(every))
            self.log(f"model state per rank (MB): {per} (each held {every[0][0] / 1e6:.2f} before the first step; "
                     "rank 0 keeps every block to evaluate)")
        self.held = (before, after)
        return self.held

    def run_epoch(self, method, batches, on_step):
        if self.held is None:
            self.hold_only_mine(method)
        with blas_threads(self.blas):
            return self._run_epoch(method, batches, on_step)

    def _recv(self, shape, step):
        h = np.empty(tuple(shape) + tuple(self.in_shape), self.dtype)
        src = self.rank - self.replicas
        self._wait(self.comm.Irecv(h, source=src, tag=_ACT_TAG), src, step)
        return h

    def _send(self, h, pending, step):
        h = np.ascontiguousarray(h)
        dest = self.rank + self.replicas
        pending.append((self.comm.Isend(h, dest=dest, tag=_ACT_TAG), h, dest))  # h stays alive until sent
        while len(pending) > 2 * max(self.share, 1):
            req, _, peer = pending.pop(0)
            self._wait(req, peer, step)

    def _step_whole(self, xb, yb, Y, pending, step):
        h = xb if self.stage == 0 else self._recv((len(xb),), step)
        for learner in self.mine:
            h = learner.forward(h)
        if not self.last_stage:
            self._send(h, pending, step)
        for learner in reversed(self.mine):
            learner.update(yb, Y)

    def _step_sliced(self, xb, yb, Y, pending, step):
        keep = range(self.replica * self.share, (self.replica + 1) * self.share)
        xs, ys, Ys, ws = split(xb, yb, Y, self.micro, keep)
        if self.stage > 0:
            b = slice_bounds(len(xb), self.micro)
            xs = [self._recv((b[r + 1] - b[r],), step) for r in keep]
        if self.replicas == 1:
            hs, records = stage_slices(self.mine, xs, ys, Ys, ws)
        else:
            flying = []  # learner i's records travel while learner i + 1 computes
            into = [views[self.replica] for views in self._xbuf] if self._xbuf else None
            hs, records = stage_slices(self.mine, xs, ys, Ys, ws, into=into,
                                       done=lambda i, recs: flying.append(self._start_exchange(i, recs)))
        if not self.last_stage:
            for h in hs:
                self._send(h, pending, step)
        for i, (learner, recs) in enumerate(zip(self.mine, records)):
            if self.replicas > 1:
                recs = self._finish_exchange(i, flying[i], step)
            combine(learner, recs)

    def _start_exchange(self, i, records):
        """Send learner i's records (this replica's slices) to the stage's other replicas and post
        the receives of theirs: point-to-point messages between buffers allocated at the first
        step, so each wait names its peer. From the second step on ``run_slice`` writes the records
        straight into the send buffer (views), so nothing is packed or copied here."""
        if len(self._xbuf) == i:  # first step: the layout is known now
            layout = record_layout(records[0])
            n = record_bytes(layout) * self.share
            self._xraw.append({q: np.empty(n, np.uint8) for q in range(self.replicas)})
            self._xbuf.append({q: unpack_records(buf, layout, self.share) for q, buf in self._xraw[i].items()})
        views = self._xbuf[i]
        if any(r is not v for r, v in zip(records, views[self.replica])):
            pack_records(records, out=self._xraw[i][self.replica])  # not written in place (the first step)
        if set(records[0]) != set(views[self.replica][0]):
            raise RuntimeError(f"learner {self.groups[self.stage][i]}: its micro-batch records changed layout")
        base, mine = self.stage * self.replicas, self._xraw[i][self.replica]
        reqs = []
        for q in range(self.replicas):
            if q != self.replica:
                reqs.append((self.stage_comm.Irecv(self._xraw[i][q], source=q, tag=_GRAD_TAG), base + q))
        for q in range(self.replicas):
            if q != self.replica:
                reqs.append((self.stage_comm.Isend(mine, dest=q, tag=_GRAD_TAG), base + q))
        for req, _ in reqs:
            req.Test()  # get the transfers going while the next learner computes
        return reqs

    def _finish_exchange(self, i, reqs, step):
        """Wait for learner i's exchange; its records of every replica, in slice (rank) order."""
        for req, peer in reqs:
            self._wait(req, peer, step)
        return [rec for q in range(self.replicas) for rec in self._xbuf[i][q]]

    def _run_epoch(self, method, batches, on_step):
        pending, losses = [], []
        self._start_epoch(method.epoch)
        for step, (xb, yb) in enumerate(batches, 1):
            self._limit = EPOCH_WAIT if step == 1 and not self._started else self.deadline
            fault_point(self.rank, method.epoch, step)
            Y = method.one_hot(yb)
            if self.micro == 1:
                self._step_whole(xb, yb, Y, pending, step)
            else:
                self._step_sliced(xb, yb, Y, pending, step)
            if self.last:
                losses.append(self.mine[-1].last_loss)
                on_step(step, losses[-1])
        self._started = True
        for req, _, peer in pending:
            self._wait(req, peer, step)
        # the root reports the epoch: it needs the output learner's losses
        reporter = (self.stages - 1) * self.replicas
        if self.last and not self.is_root:
            self.comm.Send(np.asarray(losses, np.float64), dest=0, tag=_LOSS_TAG)
        elif self.is_root and not self.last:
            losses = np.empty(step, np.float64)
            self._wait(self.comm.Irecv(losses, source=reporter, tag=_LOSS_TAG), reporter, step)
            losses = [float(v) for v in losses]
        return losses

    def gather(self, method):
        """Every stage's learner states (from its replica 0) to rank 0, which loads them into its
        copy of the model."""
        if self.replica != 0 or self.is_root:
            if self.is_root:
                for s in range(1, self.stages):
                    for k, state in unpack_states(recv_arrays(self.comm, source=s * self.replicas)).items():
                        method.learners[k].load_state_dict(state)
            return
        send_arrays(self.comm, pack_states(self.mine), dest=0)

    def abort(self, error):
        """Print one line naming this worker and end the whole job (no rank is left waiting)."""
        print(f"bll-ref train: worker {self.label()} failed: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        if os.environ.get("BLL_REF_TRACEBACK"):
            traceback.print_exception(error)
        self.comm.Abort(1)
