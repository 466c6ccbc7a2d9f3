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

import numpy as np

__all__ = ["slice_bounds", "split", "run_slice", "combine", "check_sliceable", "stage_slices", "pack_records",
           "unpack_records", "record_layout", "record_bytes", "shard_parts", "optimisers"]


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


def optimisers(learner):
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
    opts = optimisers(learner)
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


def shard_parts(learner, shard, shards) -> list[dict]:
    """Replica ``shard`` of ``shards``' share of ``learner``'s optimiser steps, per optimiser (the
    order of ``combine``) {parameter name: (lo, hi)}: near-equal contiguous runs of all its
    parameters flattened and laid end to end, cut at multiples of 16 elements (64 bytes of
    float32). Every replica computes every replica's parts the same way."""
    sizes = [(i, k, p.size) for i, opt in enumerate(optimisers(learner)) for k, p in opt.layer.params.items()]
    total = sum(n for _, _, n in sizes)
    cut = [total * r // shards // 16 * 16 for r in range(shards)] + [total]
    parts, start = [{} for _ in optimisers(learner)], 0
    for i, k, n in sizes:
        lo, hi = max(cut[shard] - start, 0), min(cut[shard + 1] - start, n)
        if hi > lo:
            parts[i][k] = (lo, hi)
        start += n
    return parts


def combine(learner, records, parts=None):
    """Apply ``records`` (slice order) to ``learner``: summed gradients, one step per optimiser,
    statistics, loss, BatchNorm buffers and the last slice's closed-form W. ``parts``
    (``shard_parts``): sum and step only those elements of the parameters (a replica's share;
    its peers step the rest and the replicas exchange the parameters, bll_ref/parallel/mpi.py)."""
    first = records[0]
    for i, opt in enumerate(optimisers(learner)):
        grads = opt.layer.grads
        if any(f"g{i}/{name}" not in first for name in opt.layer.params):
            raise RuntimeError(f"learner {learner.k}: optimiser {i} took no step in a micro-batch")
        if set(grads) != set(opt.layer.params) or any(grads[k].shape != p.shape or not grads[k].flags.c_contiguous
                                                       for k, p in opt.layer.params.items()):
            opt.layer.zero_grads()  # a replica whose layer has no gradient arrays yet (or views)
            grads = opt.layer.grads
        for name, g in grads.items():
            # summed left to right straight into the arrays the optimiser reads: ((r0 + r1) + r2) ...,
            # elementwise the same additions in the same order as a sum into a copy of r0
            key = f"g{i}/{name}"
            lo, hi = (0, g.size) if parts is None else parts[i].get(name, (0, 0))
            if hi <= lo:
                continue
            g, rs = g.reshape(-1)[lo:hi], [rec[key].reshape(-1)[lo:hi] for rec in records]
            if len(rs) == 1:
                g[...] = rs[0]
            else:
                np.add(rs[0], rs[1], out=g)
                for r in rs[2:]:
                    g += r
        opt.step(part=None if parts is None else parts[i])
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
