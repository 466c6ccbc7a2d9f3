"""MPI pipeline: one stage per contiguous group of block learners, R replica ranks per stage (mpi4py).

Every rank builds the same model structure and draws the same seeded batch order; each draws the
initial weights of the learners it trains, and only those (``shard.draw_own``; the others are
``SkipDraws`` zeros that hold no memory); rank 0 alone holds the test set, and a rank past stage 0
reads no images (``options.unread_data``). Only activations travel in a step:
rank r receives h for batch t from rank r - 1
into a preallocated buffer (buffer-based ``Recv`` of a contiguous float array, no pickling),
forwards it through its learners, sends the result on with ``Isend`` (at most two in flight),
then updates its learners. No rank holds the whole model, rank 0 included: the epoch end is a
pipeline over the stages too (``epoch_end.py``: evaluation, diagnostics, state files and the
checkpoint, which rank 0 writes as the stages' arrays arrive), and the run directory is exactly
what a sequential run writes.

Replicas (``--replicas R``, world = stages x R, rank = stage * R + replica): the batch is split into
``--micro-batches M`` slices (``slices.py``), replica q of a stage takes slices q M/R .. (q+1) M/R - 1
and talks only to replica q of the stages beside it. Before its optimisers step, a stage's
replicas exchange their slices' records, learner by learner (learner k's while learner k + 1
computes), and every replica sums them in slice (= rank) order, never in the order an ``Allreduce``
picks, so all replicas make the same step, and the same one as a sequential run with
``--micro-batches M``. ``run_slice`` writes the records straight into buffers set up at the first
step (``shm.exchange_buffers``): on one host the replicas map the same memory, so only an
8-byte note "written" travels and a peer sums the records where they lie; where they cannot share
memory (other hosts, ``BLL_REF_SHARED_DIR=""``) the records themselves travel point-to-point.
On one host the replicas also step in shares, each 1/R of the parameters (``exchange.py``).

Waiting is bounded: a watchdog thread watches every wait for a receive, send or exchange; a rank
that hears nothing from a neighbour for ``deadline`` seconds prints which rank and blocks it waited
for and aborts the job. Before its first step every rank runs its learners once on copies of them
(Numba kernels loaded or compiled, however long that takes) and the ranks meet at a barrier; until
then every wait for the others is bounded by their silence (``liveness.StartUpBeats``: a rank that
stops working stops beating) and by a long allowance (``EPOCH_WAIT``); from then on every wait has
the short deadline, the first step's included. Between epochs rank 0 evaluates (with the stages) and writes files while the others wait for its go: it
sends them a beat after every piece of that work (``beat``: an evaluation chunk, a file) and then
the start of the next epoch, all as messages on one tag (so they arrive in order), and the others
allow ``deadline`` from one message to the next; after the last epoch the run ends the same way,
with "done" once rank 0 has written the checkpoint (``finish``). The epoch end's messages between
the stages travel under the same deadline.

Launch: ``mpiexec -n K python -m mpi4py -m bll_ref.cli train --parallel mpi`` (``-m mpi4py``
turns an uncaught exception on one rank into MPI_Abort of the whole job instead of a hang).
"""
from __future__ import annotations

import copy
import itertools
import os
import sys
import threading
import time
import traceback

import numpy as np

from ..fileio import remove_partial_files
from ..memory import held_bytes, peak_resident_bytes, resident_bytes
from .base import blas_threads, check_pipelinable, fault_point
from .plan import blocks_label
from .shard import draw_own, release_others, state_bytes
from .wire import EPOCH_WAIT
from .exchange import StageExchange
from .liveness import StartUpBeats
from .slices import combine, slice_bounds, split, stage_slices
from .epoch_end import RankEpochEnd

__all__ = ["MPIPipeline", "world"]

_ACT_TAG, _LOSS_TAG, _BEAT_TAG = 5, 8, 10  # (wire.STATE_TAG = 7; the stages' own: exchange.py)
_BUSY, _DONE = -1, -2  # rank 0's tokens between epochs: busy evaluating or writing; all written (an epoch number: go)


def world():
    """MPI.COMM_WORLD; ValueError with the install hint when mpi4py or its runtime is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--parallel mpi needs mpi4py and an MPI runtime ({e}); "
                         "pip install 'bll_ref[mpi]' and launch with mpiexec") from None
    return MPI.COMM_WORLD


class MPIPipeline(RankEpochEnd):
    """This rank's part of the pipeline: stage ``rank // replicas`` runs ``groups[stage]`` learners
    of ``method`` on its share of every batch.

    ``sample_input``: a few input rows, to learn the shape of every group's input.
    ``deadline``: seconds to wait for a neighbour within an epoch (``hang_deadline``).
    ``data``: this rank's data dict, for the memory it reports (arrays this rank never reads are
    stand-ins that hold nothing: ``options.unread_data``).
    ``draws``: the ``SkipDraws`` generators the model and the method were built with, from which
    this rank draws its own learners' initial weights; None: the model has them already.
    """

    name = "mpi"

    def __init__(self, method, comm, groups, sample_input, blas=1, replicas=1, micro_batches=1, deadline=30.0,
                 log=None, data=None, draws=None, beats=None):
        check_pipelinable(method)
        self.log, self._watch = log, None
        self.beats = beats if beats is not None else StartUpBeats(comm)  # the waits until the first step
        self._started = False  # the learners ran once on copies (``_warm_up``)
        self._limit = EPOCH_WAIT
        self._beats, self._token = [], np.empty(1, np.int64)  # rank 0's beats in flight; a beat received
        arrays = list((data or {}).values())  # bytes of the whole data, and of what this rank holds of it
        self.data_bytes = (sum(a.nbytes for a in arrays), sum(held_bytes(a) for a in arrays))
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
        # every rank is here before the blocking Split (a rank hung before it is named, not waited for)
        self._start_up_wait(comm.Ibarrier(), "waiting for every rank to build its blocks")
        self.exchange = None if self.replicas == 1 else StageExchange(
            comm.Split(self.stage, self.replica), self.stage * self.replicas, self.share, self._wait,
            log if self.stage == 0 else None)
        self.is_root, self.last_stage = self.rank == 0, self.stage == self.stages - 1
        self.last = self.last_stage and self.replica == 0  # the rank that reports the losses
        self.mine = [method.learners[k] for k in self.groups[self.stage]]
        h = sample_input[:2]
        for k, learner in enumerate(method.learners):
            if k == self.groups[self.stage][0]:
                self._sample_in = h  # two rows of this stage's input (``_warm_up``)
            h = learner.forward(h, train=False)
        self.in_shape, self.out_shape = self._sample_in.shape[1:], h.shape[1:]
        self.dtype = h.dtype
        self.model_config = method.model.config()  # rank 0 writes the checkpoint's header from it
        if draws:
            draw_own(method, self.groups[self.stage], draws)
        before = state_bytes(method.learners)  # the whole model's, whether written or not
        # from here on the other learners are not this rank's business, rank 0's included (a resumed
        # run loads only its own: runstate.load; the epoch end is a pipeline too: epoch_end.py)
        release_others(method, self.groups[self.stage])
        self.held = (before, state_bytes(method.learners))

    def _label_of(self, rank) -> str:
        stage, replica = divmod(rank, self.replicas)
        rep = f", replica {replica}" if self.replicas > 1 else ""
        return f"rank {rank} ({blocks_label(self.groups[stage])}{rep})"

    def label(self) -> str:
        return self._label_of(self.rank)

    def _wait(self, req, peer, step, limit=None):
        """Complete ``req`` (a message to or from rank ``peer``; "all": a barrier of every rank) with
        MPI's own blocking ``Wait`` (mpi4py releases the GIL in it); the watchdog thread aborts
        the job if it blocks longer than ``limit`` (default: the current step's, ``_limit``).
        ``step``: the step number, or words for when the wait happens ("between epochs")."""
        self._watch = (time.perf_counter(), self._limit if limit is None else limit, peer, step)
        req.Wait()
        self._watch = None

    def _start_up_wait(self, req, what):
        """A wait for every other rank before the first step, bounded by their silence and by the
        start-up allowance (``self.beats``, liveness.py)."""
        self.beats.wait(req, "all", what, self._label_of)

    def _end_start_up(self):
        """The ranks have met before the first step (or the run ends without one): the beats stop."""
        self.beats.finish(lambda req, peer: self._wait(req, peer, "at the end of the start-up", limit=self.deadline))

    def _start_epoch(self, epoch):
        """Rank 0 sends every rank the epoch number once it has finished the last epoch
        (evaluated, written its files), after the beats it sent meanwhile (``beat``); the others
        take the beats as they come, each within ``deadline`` of the last, until the number comes.
        After it every rank is inside the epoch, so every later wait gets the short deadline."""
        if self.is_root:
            self._send_token(epoch)
            return
        token = self._await_token("between epochs")
        if token != epoch:
            raise RuntimeError(f"rank 0 started epoch {token + 1}, {self.label()} epoch {epoch + 1}")

    def _await_token(self, when) -> int:
        """The others: rank 0's next token that is not a beat, each message within ``deadline``."""
        while True:
            self._wait(self.comm.Irecv(self._token, source=0, tag=_BEAT_TAG), 0, when, limit=self.deadline)
            if int(self._token[0]) != _BUSY:
                return int(self._token[0])

    def finish(self):
        """The end of the run, on every rank: rank 0, once it has written everything (the last
        evaluation, history, state, checkpoint; beating meanwhile), tells the others it is done;
        they wait for that under the deadline, so a rank 0 hung after the last epoch is named
        within seconds instead of leaving them in MPI's finalize for ever."""
        if self.workers == 1:
            return
        if not self._started:
            self._end_start_up()  # no epoch ran (a resumed run that had all its epochs)
        if self.is_root:
            self._send_token(_DONE)
            for req, _ in self._beats:
                req.Wait()  # each rank takes all of its tokens (a dead one: mpiexec ends the job)
            self._beats = []
            return
        token = self._await_token("after the last epoch")
        if token != _DONE:
            raise RuntimeError(f"rank 0 started epoch {token + 1} after {self.label()} finished its last")

    def _send_token(self, value):
        token = np.array([value], np.int64)
        self._beats = [(r, t) for r, t in self._beats if not r.Test()]  # (t keeps the buffer alive)
        self._beats += [(self.comm.Isend(token, dest=r, tag=_BEAT_TAG), token) for r in range(1, self.workers)]

    def beat(self):
        """Rank 0, between epochs: tell the others it is alive and busy (evaluating, writing), so
        they can tell a busy rank 0 from a hung one. A no-op on the other ranks."""
        if self.is_root and self.workers > 1:
            self._send_token(_BUSY)

    def _warm_up(self, xb, yb, Y):
        """Run this rank's learners once on copies of them, on a batch of ``xb``'s size (the
        stage's sample rows repeated, past stage 0), so that every Numba kernel of a step is loaded
        or compiled before the first step, which then waits under the short deadline like any
        other. The copies are dropped; the learners themselves are untouched."""
        mine = copy.deepcopy(self.mine)
        h = xb if self.stage == 0 else np.resize(self._sample_in, (len(xb),) + tuple(self.in_shape))
        if self.micro == 1:
            for learner in mine:
                h = learner.forward(h)
            for learner in reversed(mine):
                learner.update(yb, Y)
        else:
            _, records = stage_slices(mine, *split(h, yb, Y, self.micro, range(self.share)))
            for learner, recs in zip(mine, records):
                combine(learner, recs)

    def _watchdog(self):
        """Daemon thread: ends the job when the main thread has waited too long for a neighbour."""
        while True:
            time.sleep(0.2)
            w = self._watch
            if w is not None and time.perf_counter() - w[0] > w[1]:
                _, limit, peer, step = w
                who = "every other rank" if peer == "all" else self._label_of(peer)
                when = f"at step {step}" if isinstance(step, int) else step
                self._die(f"no message from {who} for {limit:.0f} s {when}; it is dead or hung")

    def _die(self, why):
        print(f"bll-ref train: {self.label()}: {why}", file=sys.stderr, flush=True)
        remove_partial_files()  # a file rank 0 is writing from the stages' arrays: Abort does not unwind
        self.comm.Abort(1)

    def report_memory(self):
        """Rank 0 logs what every rank holds: model state and data, and resident memory now and at
        its peak (every rank calls it, at its first epoch, after a resumed run has loaded)."""
        before, after = self.held
        rss, peak = resident_bytes(), peak_resident_bytes()
        mine = np.array([before, after, *self.data_bytes, -1 if rss is None else rss, -1 if peak is None else peak],
                        np.int64)
        every = np.zeros((self.workers, len(mine)), np.int64) if self.is_root else None
        self._start_up_wait(self.comm.Igather(mine, every, root=0), "waiting for the memory report")
        if self.is_root and self.log:
            mb = lambda v: f"{v / 1e6:.2f}" if v >= 0 else "?"  # noqa: E731
            self.log("memory per rank, MB (model state, data, resident, peak resident): "
                     + "; ".join(f"{r}: {mb(a)}, {mb(d)}, {mb(m)}, {mb(p)}" for r, (_, a, _, d, m, p) in enumerate(every))
                     + f" (the whole model is {mb(every[0][0])}, the whole data {mb(every[0][2])}; rank 0 keeps "
                     "the data to evaluate)")

    def run_epoch(self, method, batches, on_step):
        if not self._started:  # the first epoch of this process (after a resumed run has loaded)
            self.report_memory()
        with blas_threads(self.blas):
            return self._run_epoch(method, batches, on_step)

    def _recv(self, shape, step, tag=_ACT_TAG):
        """The activations of ``shape`` rows from this replica's rank in the stage before."""
        h = np.empty(tuple(shape) + tuple(self.in_shape), self.dtype)
        src = self.rank - self.replicas
        self._wait(self.comm.Irecv(h, source=src, tag=tag), src, step)
        return h

    def _send(self, h, pending, step, tag=_ACT_TAG, dest=None, depth=None):
        """Send ``h`` on (default: to this replica's rank in the next stage) without waiting, keeping
        at most ``depth`` sends in flight (default: two steps' worth) in ``pending``."""
        h = np.ascontiguousarray(h)
        dest = self.rank + self.replicas if dest is None else dest
        pending.append((self.comm.Isend(h, dest=dest, tag=tag), h, dest))  # h stays alive until sent
        while len(pending) > (2 * max(self.share, 1) if depth is None else depth):
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
        x = self.exchange
        if x is None:
            hs, records = stage_slices(self.mine, xs, ys, Ys, ws)
        else:  # learner i's records travel while learner i + 1 computes, from this replica's buffers
            flying = []
            hs, records = stage_slices(self.mine, xs, ys, Ys, ws, into=x.into(),
                                       done=lambda i, recs: flying.append(x.start(i, self.mine[i], recs, step)))
        if not self.last_stage:
            for h in hs:
                self._send(h, pending, step)
        for i, (learner, recs) in enumerate(zip(self.mine, records)):
            if x is None:
                combine(learner, recs)
            else:
                x.step(i, learner, flying[i], step)
        if x is not None:
            x.settle(step)  # the other replicas' shares of the step

    def _run_epoch(self, method, batches, on_step):
        pending, losses = [], []
        if not self._started:
            batches = iter(batches)
            first = next(batches)
            self._warm_up(*first, method.one_hot(first[1]))
            self._start_up_wait(self.comm.Ibarrier(), "waiting for every rank to load or compile its kernels")
            self._end_start_up()
            batches, self._started = itertools.chain([first], batches), True
        self._limit = self.deadline
        self._start_epoch(method.epoch)
        for step, (xb, yb) in enumerate(batches, 1):
            fault_point(self.rank, method.epoch, step)
            Y = method.one_hot(yb)
            if self.micro == 1:
                self._step_whole(xb, yb, Y, pending, step)
            else:
                self._step_sliced(xb, yb, Y, pending, step)
            if self.last:
                losses.append(self.mine[-1].last_loss)
                on_step(step, losses[-1])
        for req, _, peer in pending:
            self._wait(req, peer, step)
        # the root reports the epoch: it needs the output learner's losses
        reporter = (self.stages - 1) * self.replicas
        if self.last and not self.is_root:
            self._wait(self.comm.Isend(np.asarray(losses, np.float64), dest=0, tag=_LOSS_TAG), 0, step)
        elif self.is_root and not self.last:
            losses = np.empty(step, np.float64)
            self._wait(self.comm.Irecv(losses, source=reporter, tag=_LOSS_TAG), reporter, step)
            losses = [float(v) for v in losses]
        return losses

    def gather(self, method):
        """A replicated stage's whole optimiser states onto its replica 0, which takes the stage's
        part in the epoch end (``epoch_end.RankEpochEnd``)."""
        if self.exchange is not None:
            self.exchange.collect_state(self.mine, "at the epoch's end")

    def abort(self, error):
        """Print one line naming this worker and end the whole job (no rank is left waiting)."""
        print(f"bll-ref train: worker {self.label()} failed: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        if os.environ.get("BLL_REF_TRACEBACK"):
            traceback.print_exception(error)
        remove_partial_files()
        self.comm.Abort(1)
