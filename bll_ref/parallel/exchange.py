"""The replicas of one pipeline stage (bll_ref/parallel/mpi.py, ``--replicas R``): what they
exchange in a step, learner by learner.

1. **Records.** Each replica runs its slices of the batch and hands the records (gradients times
   slice weights, statistics; ``slices.py``) to the others: on one host only an 8-byte note
   "written" travels and a peer reads the records where they lie (``shm.exchange_buffers``);
   otherwise the records themselves travel point to point.
2. **The step, in shares** (shared memory only). Every replica used to sum all R records and step
   the whole optimiser, R times the same work. Now replica q sums and steps only its share of
   the parameters (``slices.shard_parts``: contiguous runs, cut at multiples of 16 elements), leaves the
   stepped parameters in its shared buffer and sends a note; the others copy them in before the
   learner runs again (``shm.put_params``, ``take_params``). Sums run in slice (rank) order and the
   optimisers' updates are elementwise, so the parameters are bit for bit those of the whole
   step. An optimiser's moments are then current on each replica only in its own share: at an
   epoch's end replica 0 takes the others' shares (``collect_state``) before its state goes to
   rank 0, so checkpoints are whole. ``BLL_REF_SHARD_STEP=0`` turns the shares off (every
   replica steps everything, as over messages).

Ordering without locks: a replica writes its parameter buffer again one step later, after the
notes of every peer's records of that step, which a peer sends only after it has taken this
step's parameters (it needed them to compute the records).
"""
from __future__ import annotations

import os

import numpy as np

from .shm import exchange_buffers, param_buffers, put_params, take_params
from .slices import optimisers, combine, pack_records, record_layout
from .wire import recv_arrays, send_arrays

__all__ = ["StageExchange"]

_GRAD_TAG, _PARAM_TAG = 9, 11  # on the stage's own communicator


class StageExchange:
    """This replica's side of the exchanges of its stage. ``comm``: the stage's communicator
    (replica q is its rank q); ``base``: the world rank of replica 0; ``share``: micro-batches per
    replica; ``wait(request, world rank, step)`` completes a request under the caller's
    deadline; ``log``: where the path taken is reported (rank 0), or None."""

    def __init__(self, comm, base, share, wait, log=None):
        self.comm, self.base, self.share, self.wait, self.log = comm, base, share, wait, log
        self.me, self.size = comm.Get_rank(), comm.Get_size()
        self.peers = [q for q in range(self.size) if q != self.me]
        self.shard = os.environ.get("BLL_REF_SHARD_STEP", "1") != "0"
        self.raw, self.views = [], []  # per learner: [this step's turn, the next] of replica -> buffer / records
        self.params = []  # per learner: (parts, buffers) of the step in shares, or None
        self._taking = []  # (learner, its params entry, notes in flight) until ``settle``

    def into(self):
        """Per learner, this replica's records of this step to write into (None before the first step)."""
        return [views[0][self.me] for views in self.views] if self.views else None

    def start(self, i, learner, records, step):
        """Hand learner i's records (this replica's slices) to the others; returns what ``step``
        waits for. ``run_slice`` wrote them into this step's buffer (after the first step)."""
        wait = lambda req, q: self.wait(req, self.base + q, step)  # noqa: E731
        if len(self.views) == i:  # first step: the layout is known now
            raw, views = exchange_buffers(self.comm, record_layout(records[0]), self.share, tag=_GRAD_TAG, wait=wait)
            self.raw.append(raw)
            self.views.append(views)
            shared = raw[0] is not raw[1]
            self.params.append(param_buffers(self.comm, learner, wait, _PARAM_TAG) if shared and self.shard else None)
            if i == 0 and self.log:
                how = "shared memory" if shared else "messages"
                steps = ", each stepping its share of the parameters" if self.params[0] else ""
                self.log(f"replicas of stage 1 exchange records through {how}{steps}")
        raw, views, shared = self.raw[i][0], self.views[i][0], self.raw[i][0] is not self.raw[i][1]
        self.raw[i].reverse(), self.views[i].reverse()  # the other turn next step
        if any(r is not v for r, v in zip(records, views[self.me])):
            pack_records(records, out=raw[self.me])  # not written in place (the first step)
        if set(records[0]) != set(views[self.me][0]):
            raise RuntimeError(f"learner {learner.k}: its micro-batch records changed layout")
        reqs = [(self.comm.Irecv(np.empty(1, np.int64) if shared else raw[q], source=q, tag=_GRAD_TAG), q)
                for q in self.peers]
        reqs += [(self.comm.Isend(np.array([i], np.int64) if shared else raw[self.me], dest=q, tag=_GRAD_TAG), q)
                 for q in self.peers]
        for req, _ in reqs:
            req.Test()  # get the transfers going while the next learner computes
        return reqs, views

    def step(self, i, learner, flying, step):
        """Wait for learner i's records (``flying``), then step it: the whole step, or this
        replica's share, whose parameters it leaves for the others (taken in ``settle``)."""
        for req, q in flying[0]:
            self.wait(req, self.base + q, step)
        records = [rec for q in range(self.size) for rec in flying[1][q]]  # slice (rank) order
        entry = self.params[i]
        if entry is None:
            combine(learner, records)
            return
        parts, bufs = entry
        combine(learner, records, parts[self.me])
        put_params(learner, parts[self.me], bufs[self.me])
        notes = [(self.comm.Irecv(np.empty(1, np.int64), source=q, tag=_PARAM_TAG), q) for q in self.peers]
        notes += [(self.comm.Isend(np.array([i], np.int64), dest=q, tag=_PARAM_TAG), q) for q in self.peers]
        self._taking.append((learner, entry, notes))

    def settle(self, step):
        """Take the other replicas' shares of every learner stepped in shares this step."""
        for learner, (parts, bufs), notes in self._taking:
            for req, q in notes:
                self.wait(req, self.base + q, step)
            take_params(learner, parts, bufs, self.me)
        self._taking = []

    def collect_state(self, learners, when):
        """Epoch end: replica 0 takes every other replica's share of the optimiser states of the
        learners stepped in shares (moments, velocities: entries shaped like their parameter)."""
        wait = lambda req, q: self.wait(req, self.base + q, when)  # noqa: E731
        for learner, entry in zip(learners, self.params):
            if entry is None:
                continue
            parts, opts = entry[0], optimisers(learner)
            states = [opt.state_dict() for opt in opts]
            if self.me != 0:
                mine = {f"{j}|{key}": states[j][key].reshape(-1)[slice(*part[key.split("/", 1)[1]])]
                        for j, (opt, part) in enumerate(zip(opts, parts[self.me]))
                        for key in _shaped(states[j], opt) if key.split("/", 1)[1] in part}
                send_arrays(self.comm, mine, dest=0, wait=wait)
                continue
            for q in self.peers:
                for name, piece in recv_arrays(self.comm, source=q, wait=wait).items():
                    j, key = name.split("|", 1)
                    lo, hi = parts[q][int(j)][key.split("/", 1)[1]]
                    states[int(j)][key].reshape(-1)[lo:hi] = piece
            for opt, state in zip(opts, states):
                opt.load_state_dict(state)


def _shaped(state, opt):
    """The entries of an optimiser's state that hold one value per parameter element."""
    params = opt.layer.params
    return [key for key, v in state.items()
            if "/" in key and key.split("/", 1)[1] in params and np.shape(v) == params[key.split("/", 1)[1]].shape]
