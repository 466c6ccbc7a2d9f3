"""Micro-batches: a batch split into R slices whose gradients are summed in a fixed order before
each optimiser steps (``--micro-batches R``), the arithmetic that MPI replicas of a pipeline stage
reproduce bit for bit (``--replicas``).

For one learner and one step, slice r (rows ``bounds[r]:bounds[r+1]`` of the batch, n_r of N rows)
is run by ``run_slice``: forward with the pre-step weights, then the learner's own ``update`` with
every optimiser's ``step`` deferred. What the step would have changed is kept in a **record**
(a flat dict of arrays, the same layout for every slice of a learner):

* ``g<i>/<name>``: optimiser i's gradients times w_r = n_r / N. Every loss of a learner is a mean
  over its batch (softmax cross-entropy, the variational terms, the head), so the slice gradients
  times w_r sum to the full-batch gradient in exact arithmetic (up to what depends on the slice,
  below);
* ``stat/<name>``: the slice's statistics times w_r (the per-step means; ``steps`` counts steps);
* ``bn<j>/<buffer>``: BatchNorm j's running-statistics increment ``momentum * batch statistic``,
  measured by running the slice from zeroed buffers (0 * (1 - momentum) + inc = inc exactly);
* ``W``: the closed-form feedback fitted on the slice (the last slice's is kept).

``combine`` then applies the records in slice order: gradients summed left to right (r = 0, 1, ...)
into the layers' gradient arrays and each optimiser stepped once; statistics and the loss summed
in the same order; the BatchNorm running buffers updated once per slice, in order, exactly as R
sequential forwards would. A sequential run, a thread pipeline and MPI replicas (which share
records in memory on one host, ``exchange_buffers``, or send them point to point, and sum them in
rank order, never in the order ``Allreduce`` picks) all call these two functions, so they agree
bit for bit.

What depends on the slice, not the batch (documented in docs/parallel.md): BatchNorm normalises
with the slice's statistics, and closed-form feedback is fitted on the slice. Running
feedback statistics (``--feedback-decay``) would chain through the slices, which replicas cannot
do in parallel: micro-batches refuse them. ``R = 1`` never comes here (the learner's plain step).
"""
from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

from .wire import blocking_wait

__all__ = ["slice_bounds", "split", "run_slice", "combine", "check_sliceable", "stage_slices", "pack_records",
           "unpack_records", "record_layout", "record_bytes", "shared_buffers", "exchange_buffers", "SHARED_DIR"]

#: where ``shared_buffers`` puts the file its ranks map (a RAM file system on Linux); the
#: environment variable BLL_REF_SHARED_DIR overrides it, and set empty turns sharing off
SHARED_DIR = "/dev/shm"


def slice_bounds(n, slices) -> list[int]:
    """Row bounds of ``slices`` near-equal slices of n rows (the first n % slices one row longer)."""
    if n < slices:
        raise ValueError(f"a batch of {n} rows cannot be split into {slices} micro-batches; use a batch size "
                         f"(and a training-set size) whose every batch has at least {slices} rows")
    q, rem = divmod(n, slices)
    sizes = [q + (r < rem) for r in range(slices)]
    return [int(v) for v in np.concatenate([[0], np.cumsum(sizes)])]


def split(x, y, Y, slices, keep=None):
    """(xs, ys, Ys, weights): the batch as ``slices`` slices and their weights n_r / N; ``keep``
    (a range of slice indices) returns only those (an MPI replica's share)."""
    bounds = slice_bounds(len(x), slices)
    keep = range(slices) if keep is None else keep
    rows = Y.shape[0] // len(x)  # one-hot rows per example (sequence labels give T each)
    parts = [(x[bounds[r]:bounds[r + 1]], y[bounds[r]:bounds[r + 1]], Y[rows * bounds[r]:rows * bounds[r + 1]],
              (bounds[r + 1] - bounds[r]) / len(x)) for r in keep]
    return tuple(list(t) for t in zip(*parts))


def _leaves(layer):
    if hasattr(layer, "layers"):
        for child in layer.layers:
            yield from _leaves(child)
    elif hasattr(layer, "body"):
        yield from _leaves(layer.body)
        if layer.shortcut is not None:
            yield from _leaves(layer.shortcut)
    else:
        yield layer


def _norms(learner):
    """The layers with running buffers (BatchNorm) of the learner's block and head, in order."""
    parts = [learner.block] + ([learner.head] if getattr(learner, "head", None) is not None else [])
    return [leaf for part in parts for leaf in _leaves(part) if leaf.buffers]


def _feedback_net(learner):
    """The learner's feedback network (closed-form or trained), or None."""
    return getattr(getattr(learner, "source", None), "net", None)


def _optimisers(learner):
    """Block, head and trained-feedback optimisers, in a fixed order (absent ones skipped)."""
    net = _feedback_net(learner)
    cands = (learner.opt, getattr(learner, "head_opt", None), getattr(net, "opt", None))
    return [o for o in cands if o is not None]


def check_sliceable(method):
    """ValueError unless every learner of ``method`` can be micro-batched exactly."""
    if not hasattr(method, "learners"):
        raise ValueError(f"--micro-batches splits the steps of BLL's block learners; method {method.name!r} has "
                         "none (leave --micro-batches at 1)")
    if method.span != 1 or method.twin is not None:
        raise ValueError("--micro-batches needs span 1 and closed or trained feedback (span 2 and twin "
                         "feedback pass messages between blocks); leave it at 1")
    for learner in method.learners:
        net = _feedback_net(learner)
        if getattr(net, "decay", None) is not None:
            raise ValueError("--feedback-decay keeps running statistics that chain through the micro-batches; "
                             "leave it out or --micro-batches at 1")
        for layer in _norms(learner):
            if not hasattr(layer, "momentum"):
                raise ValueError(f"block {learner.k + 1}: {type(layer).__name__} keeps buffers that micro-batches "
                                 "do not know how to combine")


def _put(rec, key, value):
    """rec[key] = value, written into rec's array when it has one of that shape (a reused record,
    or a view into an MPI send buffer), else stored."""
    old = rec.get(key)
    if isinstance(old, np.ndarray) and old.shape == np.shape(value) and old.flags.writeable:
        old[...] = value
    else:
        rec[key] = value


def run_slice(learner, h, y, Y, weight, out=None):
    """Forward slice ``h`` through ``learner`` and take its update with the optimiser steps
    deferred. Returns (h_out, record); the learner's parameters, optimiser states, statistics
    and buffers are as before the call (its caches are the slice's).

    ``out``: a record of the same layout to write into (an older step's, or views into an MPI
    send buffer), so no array is allocated for it; it is returned as the record."""
    rec = {} if out is None else out
    opts = _optimisers(learner)
    w = np.float64(weight)

    def deferred(i, opt):
        def step():
            for name, g in opt.layer.grads.items():
                key, scale = f"g{i}/{name}", g.dtype.type(weight)
                dst = rec.get(key)
                if isinstance(dst, np.ndarray) and dst.shape == g.shape and dst.dtype == g.dtype:
                    np.multiply(g, scale, out=dst)  # the same product as g * scale, written in place
                else:
                    rec[key] = g * scale
        return step

    norms = _norms(learner)
    saved = [{k: v.copy() for k, v in layer.buffers.items()} for layer in norms]
    for layer in norms:
        for v in layer.buffers.values():
            v[...] = 0
    net = _feedback_net(learner)
    closed = net is not None and not hasattr(net, "opt")  # closed form: W is fitted on each slice
    W = net.W if closed else None
    stats = learner.stats
    learner.stats = {k: 0.0 for k in learner.STATS}
    for i, opt in enumerate(opts):
        opt.step = deferred(i, opt)
    try:
        h_out = learner.forward(h)
        learner.update(y, Y)
        for k, v in learner.stats.items():
            _put(rec, f"stat/{k}", np.float64(float(v)) * w)
        if hasattr(learner, "last_loss"):
            _put(rec, "loss", np.float64(float(learner.last_loss)) * w)
        for j, layer in enumerate(norms):
            for k, v in layer.buffers.items():
                _put(rec, f"bn{j}/{k}", v.copy())
        if closed:
            _put(rec, "W", np.array(net.W))
    finally:
        for opt in opts:
            del opt.step  # the class's step again
        learner.stats = stats
        if closed:
            net.W = W
        for layer, old in zip(norms, saved):
            for k, v in layer.buffers.items():
                v[...] = old[k]
    return h_out, rec


def combine(learner, records):
    """Apply ``records`` (slice order) to ``learner``: summed gradients, one step per optimiser,
    statistics, loss, BatchNorm buffers and the last slice's closed-form W."""
    first = records[0]
    for i, opt in enumerate(_optimisers(learner)):
        grads = opt.layer.grads
        if any(f"g{i}/{name}" not in first for name in opt.layer.params):
            raise RuntimeError(f"learner {learner.k}: optimiser {i} took no step in a micro-batch")
        if set(grads) != set(opt.layer.params) or any(grads[k].shape != p.shape for k, p in opt.layer.params.items()):
            opt.layer.zero_grads()  # a replica whose layer has no gradient arrays yet
            grads = opt.layer.grads
        for name, g in grads.items():
            # summed left to right straight into the arrays the optimiser reads: ((r0 + r1) + r2) ...,
            # elementwise the same additions in the same order as a sum into a copy of r0
            key = f"g{i}/{name}"
            if len(records) == 1:
                g[...] = first[key]
            else:
                np.add(first[key], records[1][key], out=g)
                for rec in records[2:]:
                    g += rec[key]
        opt.step()
    for k in learner.STATS:
        if k == "steps":
            learner.stats[k] += 1
            continue
        acc = 0.0
        for rec in records:
            acc += float(rec[f"stat/{k}"])
        learner.stats[k] += acc
    if "loss" in first:
        acc = 0.0
        for rec in records:
            acc += float(rec["loss"])
        learner.last_loss = acc
    for j, layer in enumerate(_norms(learner)):
        mom = layer.momentum
        for rec in records:  # the update BatchNorm.forward makes, once per slice, in slice order
            for k, v in layer.buffers.items():
                v *= 1 - mom
                v += rec[f"bn{j}/{k}"]
    if "W" in first:
        net = learner.source.net
        net.W = records[-1]["W"].copy()


def stage_slices(learners, hs, ys, Ys, weights, into=None, done=None):
    """Run slices ``hs`` (list) through consecutive ``learners``: returns (outputs, records per
    learner). Nothing is stepped yet: hand the outputs on, then ``combine`` each learner.

    ``into``: records per learner to write into (``run_slice``'s ``out``; an older step's, or
    views into a send buffer). ``done(i, records)`` is called as soon as learner i's records are
    complete, while the next learner computes (an MPI replica starts their exchange there)."""
    all_records = []
    for i, learner in enumerate(learners):
        outs, recs = [], []
        for j, (h, y, Y, w) in enumerate(zip(hs, ys, Ys, weights)):
            out, rec = run_slice(learner, h, y, Y, w, out=None if into is None else into[i][j])
            outs.append(out)
            recs.append(rec)
        all_records.append(recs)
        if done is not None:
            done(i, recs)
        hs = outs
    return hs, all_records


def record_layout(record) -> list:
    """[(name, dtype str, shape)] of a record, in the order ``pack_records`` writes it."""
    return [(n, np.asarray(record[n]).dtype.str, np.shape(record[n])) for n in sorted(record)]


def record_bytes(layout) -> int:
    return int(sum(np.dtype(d).itemsize * int(np.prod(shape, dtype=np.int64)) for _, d, shape in layout))


def pack_records(records, out=None) -> tuple[np.ndarray, list]:
    """Records of one learner (same keys each) into one uint8 buffer (``out``, or a new one) and
    their layout."""
    layout = record_layout(records[0])
    size = record_bytes(layout)
    buf = np.empty(size * len(records), np.uint8) if out is None else out
    if len(buf) != size * len(records):
        raise ValueError(f"micro-batch records need {size * len(records)} bytes, the buffer has {len(buf)}")
    pos = 0
    for rec in records:
        for name, _, _ in layout:
            v = np.ascontiguousarray(rec[name]).reshape(-1).view(np.uint8)
            buf[pos:pos + len(v)] = v
            pos += len(v)
    return buf, layout


def unpack_records(buf, layout, count) -> list[dict]:
    """Inverse of ``pack_records`` for ``count`` records of ``layout``."""
    out, pos = [], 0
    for _ in range(count):
        rec = {}
        for name, dtype, shape in layout:
            dt = np.dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            rec[name] = buf[pos:pos + n].view(dt).reshape(shape)  # a view: ``buf`` is the caller's, fresh
            pos += n
        out.append(rec)
    if pos != len(buf):
        raise ValueError(f"micro-batch records: {len(buf)} bytes for {count} records of {pos // max(count, 1)}")
    return out


def shared_buffers(comm, nbytes, wait=None, tag=0):
    """[uint8 array of ``nbytes``] for every rank of ``comm`` (an mpi4py intracommunicator), all
    in one file under ``SHARED_DIR`` that every rank maps: a rank reads what another wrote there
    with no message and no copy. None on every rank when they cannot all map it (ranks on other
    hosts, no ``SHARED_DIR``). Every rank calls it; ``wait(request, peer)`` completes each of its
    point-to-point messages (on ``tag``) between rank 0 and a peer (default: MPI's ``Wait``).

    Rank 0 creates the file once every rank has said it is here, with a random token at its start
    (a rank that reads another token, a same-named file on another host, counts as unable), and
    unlinks it as soon as every rank has tried to map it: a rank that dies later leaves nothing
    behind (the memory goes with the last mapping; the arrays keep theirs alive)."""
    wait = wait or blocking_wait
    others = range(1, comm.Get_size())
    head, step = 64, -(-int(nbytes) // 64) * 64  # every rank's buffer starts 64-byte aligned
    total = head + step * comm.Get_size()
    msg, word = np.zeros(512, np.uint8), np.zeros(1, np.int64)  # msg: token (16 bytes), then the path
    if comm.Get_rank() == 0:
        for q in others:
            wait(comm.Irecv(word, source=q, tag=tag), q)  # q is here
        _create_shared(total, msg)
        for q in others:
            wait(comm.Isend(msg, dest=q, tag=tag), q)
    else:
        wait(comm.Isend(word, dest=0, tag=tag), 0)
        wait(comm.Irecv(msg, source=0, tag=tag), 0)
    token, path = msg[:16].tobytes(), os.fsdecode(msg[16:].tobytes().rstrip(b"\0"))
    mem = None
    if path:
        try:
            with open(path, "r+b") as f:
                mem = mmap.mmap(f.fileno(), total)
            if mem[:16] != token:
                mem.close()
                mem = None
        except (OSError, ValueError):
            mem = None
    ok = np.array([mem is not None], np.int64)
    if comm.Get_rank() == 0:
        for q in others:
            wait(comm.Irecv(word, source=q, tag=tag), q)
            ok &= word
        if path:
            os.unlink(path)
        for q in others:
            wait(comm.Isend(ok, dest=q, tag=tag), q)
    else:
        wait(comm.Isend(ok.copy(), dest=0, tag=tag), 0)
        wait(comm.Irecv(ok, source=0, tag=tag), 0)
    if not ok[0]:
        if mem is not None:
            mem.close()
        return None
    return [np.frombuffer(mem, np.uint8, count=int(nbytes), offset=head + r * step) for r in range(comm.Get_size())]


def _create_shared(total, msg):
    """Create the file of ``shared_buffers`` (``total`` bytes, a random token at its start) and write
    the token and its path into ``msg``; its path, or "" (msg left zero) where that fails."""
    where = os.environ.get("BLL_REF_SHARED_DIR", SHARED_DIR)
    if not where or not hasattr(os, "posix_fallocate"):
        return ""  # sharing turned off, or no way to reserve the pages (not Linux)
    try:
        fd, path = tempfile.mkstemp(prefix="bll_ref_records_", dir=where)
    except OSError:
        return ""
    token, raw = os.urandom(16), os.fsencode(path)
    try:
        os.posix_fallocate(fd, 0, total)  # the pages now, or ENOSPC (a full /dev/shm would be SIGBUS later)
        os.pwrite(fd, token, 0)
        written = 16 + len(raw) <= len(msg)
    except OSError:
        written = False
    finally:
        os.close(fd)
    if not written:
        os.unlink(path)
        return ""
    msg[:16 + len(raw)] = np.frombuffer(token + raw, np.uint8)
    return path


def exchange_buffers(comm, layout, count, wait=None, tag=0):
    """Buffers for one learner's records (``count`` of ``layout`` per rank), exchanged among the
    ranks of ``comm`` (the replicas of a stage, bll_ref/parallel/mpi.py): (raw, views), each a
    pair of per-turn dicts {rank: uint8 buffer} and {rank: [records, views into it]}; a step uses
    turn 0 and swaps the pair. Every rank of ``comm`` calls it (``wait``, ``tag``: ``shared_buffers``).

    On one host (``shared_buffers``) every rank has two buffers, the turns: a peer sums a rank's
    records where they were written, with no message of their bytes, only a short note "written"
    (whose receipt orders the writes before the peer's reads: MPI's shared-memory transport fences
    its messages). A rank writes a buffer again two steps later, after every peer's note of the
    step between, which a peer sends only once it has finished the step before, its sums included.
    Otherwise both turns are the same buffers, which the records are sent from and received into."""
    n = record_bytes(layout) * count
    shared = shared_buffers(comm, 2 * n, wait, tag)
    if shared is None:
        raw = {q: np.empty(n, np.uint8) for q in range(comm.Get_size())}
        views = {q: unpack_records(buf, layout, count) for q, buf in raw.items()}
        return [raw, raw], [views, views]
    raw = [{q: buf[t * n:(t + 1) * n] for q, buf in enumerate(shared)} for t in (0, 1)]
    return raw, [{q: unpack_records(buf, layout, count) for q, buf in r.items()} for r in raw]
