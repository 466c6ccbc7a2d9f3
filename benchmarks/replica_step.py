"""What a replica of an MPI stage does after its slices, timed in one process: the whole combine
(sum R records, step every optimiser) against the step in shares (sum and step 1/R of the
parameters, then copy its share out and the others' in; bll_ref/parallel/exchange.py), for the
4-block MLP of benchmarks/parallel.py, plus the memory copy rate at one learner's record size and
at the 16 MB that benchmarks/parallel.py's pipeline model uses.

    python benchmarks/replica_step.py [--repeats 30] [--results DIR]

Interleaved medians (common.interleaved), 1 BLAS thread. One process only: the rates two ranks
get while the other copies too are what benchmarks/parallel.py measures.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine, write  # noqa: E402
from parallel import build_method, make_batches  # noqa: E402

from bll_ref.parallel import blas_threads  # noqa: E402
from bll_ref.parallel.shm import put_params, take_params  # noqa: E402
from bll_ref.parallel.slices import combine, optimisers, record_bytes, record_layout, run_slice, shard_parts, split  # noqa: E402


def replica_fns(R):
    """{name: callable} for R replicas of the whole 4-block MLP (one stage), and the record bytes."""
    x, y = make_batches(1)[0]
    m = build_method(x)
    m.train_step(x, y)  # every gradient array exists
    h, Y, recs = x, m.one_hot(y), []
    for learner in m.learners:
        recs.append([run_slice(learner, *a)[1] for a in zip(*split(h, y, Y, R))])
        h = learner.forward(h, train=False)
    parts = [[shard_parts(l, q, R) for q in range(R)] for l in m.learners]
    bufs = [[np.empty(4 * sum(hi - lo for part in ps for lo, hi in part.values()), np.uint8) for ps in per]
            for per in parts]  # each replica's share of float32 parameters

    def share():
        for i, learner in enumerate(m.learners):
            combine(learner, recs[i], parts[i][0])
            put_params(learner, parts[i][0], bufs[i][0])
            take_params(learner, parts[i], bufs[i], 0)

    fns = {"whole combine": lambda: [combine(l, r) for l, r in zip(m.learners, recs)],
           "share: combine + copies": share,
           "optimiser steps alone": lambda: [o.step() for l in m.learners for o in optimisers(l)]}
    return fns, max(record_bytes(record_layout(r[0])) for r in recs)


def copy_fns(sizes):
    out = {}
    for n in sizes:
        src, dst = np.ones(n // 4, np.float32), np.empty(n // 4, np.float32)
        out[f"copy {n >> 20} MB"] = lambda s=src, d=dst: np.copyto(d, s)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--results", default=None, help="output directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    rows, payload = [], {"machine": machine(), "repeats": args.repeats, "replicas": {}}
    with blas_threads(1):
        for R in (2, 4):
            fns, rec = replica_fns(R)
            med, _ = interleaved(fns, repeats=args.repeats)
            payload["replicas"][R] = {"ms": {k: 1e3 * v for k, v in med.items()}, "record_bytes": rec}
            rows += [f"| {R} | {k} | {1e3 * v:.2f} |" for k, v in med.items()]
        sizes = (4 << 20, 16 << 20)
        med, _ = interleaved(copy_fns(sizes), repeats=args.repeats)
        payload["copy_GB_per_s"] = {k: n / v / 1e9 for (k, v), n in zip(med.items(), sizes)}
    md = ("Replica step of the 4-block MLP 784-1024-1024-1024-10 (batch 128, one process, 1 BLAS thread, "
          f"median of {args.repeats} interleaved repeats, {payload['machine']['date']})\n\n"
          "| replicas R | what replica 0 does after its slices | ms |\n|---|---|---|\n" + "\n".join(rows)
          + "\n\nmemory copy, one process: "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in payload["copy_GB_per_s"].items()))
    write("replica_step", payload, md, out=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
