"""The pipeline model of benchmarks/parallel.py: seconds per step of S stages x R replicas from
measured block costs, message times and memory copy rates. Pure functions of their inputs (no
measuring here), so tests can check the model's arithmetic (tests/test_parallel_model.py).

Pipeline model for S stages x R replicas (``predict_step``): a replica of stage g processes N / R
rows through its blocks (cost_k(N / R), measured at that many rows), exchanges its gradients with
the other R - 1 replicas, and sends its activations on (one message of N / R rows; a message's time
interpolated between the ping-pong's sizes, 8 B to 16 MiB, because the cost per byte changes with
the size). Replicas on one host share their records in memory (``exchange_buffers`` in
bll_ref/parallel/shm.py): one 8-byte note per learner and peer travels; across hosts (the TCP
column of the deep table) one message per learner and peer of that learner's parameter bytes.
Replicas on one host also step in shares (bll_ref/parallel/exchange.py): each sums and steps
1/R of the parameters (the optimiser's measured seconds drop by (R - 1)/R), copies the
parameters once (its share out, the others' in) and sends a second note per learner and peer.
Writing its record and summing the R replicas' records costs 1 + 1.5 (R - 1) copies of their bytes
at the memory copy rate measured before the runs with k = min(W, C) processes copying at the same
time (W ranks on C cores): those passes are memory-bound and run while the other ranks compute and
sum beside them, so each gets a share of the memory bandwidth, not all of it (the results list the
rates; a prediction for more cores than this machine has uses the most processes measured). A step
takes the slowest stage's time. With W = S R ranks on C < W cores, the ranks share the cores: the
compute part is stretched by W / C (waiting ranks poll), and never faster than the total work over
min(C, W).
"""
from __future__ import annotations

N = 128  # rows of a batch
ACT_BYTES = N * 1024 * 4  # one (128, 1024) float32 activation
ROWS = tuple(N >> i for i in range(7))  # 128, 64, ..., 2: the rows of a replica's slice for R = 1..64


def cost_at(costs, n):
    """Per-block seconds at ``n`` rows, as measured (``costs`` is keyed by rows, int or str)."""
    by_rows = {int(k): v for k, v in costs.items()}
    if int(n) != n or int(n) not in by_rows:
        raise ValueError(f"no block costs measured at {n} rows (measured: {sorted(by_rows)})")
    return by_rows[int(n)]


def message_s(msg, nbytes):
    """One-way time of an ``nbytes`` message: piecewise linear between the ping-pong's sizes
    (8 B, one activation, 4 and 16 MiB where measured), the last segment's cost per byte beyond."""
    pts = sorted((m["bytes"], m["one_way_s"]) for m in msg.values() if isinstance(m, dict) and "bytes" in m)
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if nbytes <= b1 or (b1, t1) == pts[-1]:
            return t0 + (nbytes - b0) * max(t1 - t0, 0.0) / (b1 - b0)
    return pts[0][1]


def copy_counts(cores):
    """Numbers of processes the copy rate is measured with: 1, 2, 4, ... and ``cores``."""
    return sorted({1 << i for i in range(max(int(cores), 1).bit_length()) if 1 << i <= cores} | {max(int(cores), 1)})


def copy_rate_at(rates, k):
    """The copy rate measured with the most processes at once, at most ``k`` (``rates``: {k: bytes/s},
    keys int or str)."""
    by_k = {int(n): r for n, r in rates.items()}
    return by_k[max(n for n in by_k if n <= max(k, 1))]


def predict_step(costs, groups, replicas, msg, pbytes, cores, copy_rates, shared=True, act_bytes=ACT_BYTES,
                 opt_s=None):
    """Seconds per step of ``groups`` (stages) x ``replicas`` on ``cores`` cores (module docstring).
    ``shared``: the replicas of a stage share a host (their records in shared memory). ``opt_s``:
    seconds of each learner's optimiser steps; given with ``shared``, the replicas step in shares."""
    c = cost_at(costs, N / replicas)
    comm = message_s(msg, act_bytes / replicas) if len(groups) > 1 else 0.0
    w = len(groups) * replicas
    rate = copy_rate_at(copy_rates, min(w, cores))
    shares = shared and opt_s is not None and replicas > 1
    stage = []
    for g in groups:
        b = sum(pbytes[k] for k in g)
        # per learner and peer one message (bll_ref/parallel/mpi.py): an 8-byte note when the records
        # are shared, else the records (its gradient bytes); writing the replica's record (one copy)
        # and summing R records into the gradients (R - 1 additions, ~1.5 copies each)
        sent = [8 if shared else pbytes[k] for k in g]
        exch = ((replicas - 1) * sum(message_s(msg, n) for n in sent)
                + (1 + 1.5 * (replicas - 1)) * b / rate) if replicas > 1 else 0.0
        own = sum(c[k] for k in g)
        if shares:  # in shares (bll_ref/parallel/exchange.py): 1/R of the sums and of the optimiser steps,
            # a second note per learner and peer, and one copy of the parameters (its share out, the rest in)
            exch = ((replicas - 1) * 2 * len(g) * message_s(msg, 8)
                    + (1 + 1.5 * (replicas - 1) / replicas + 1) * b / rate)
            own -= (replicas - 1) / replicas * sum(opt_s[k] for k in g)
        stage.append(own + exch)
    compute = max(stage)
    if w > cores:
        compute *= w / cores
    saved = (replicas - 1) * sum(opt_s) if shares else 0.0  # optimiser work no longer repeated R times
    work = replicas * sum(c) - saved
    return max(compute, work / min(cores, w)) + comm


def best_split(costs, ranks, msg, pbytes, cores, n_blocks, copy_rates, shared=True, opt_s=None):
    """The (stages, replicas, speed-up) with stages x replicas = ranks that the model likes best."""
    from bll_ref.parallel import balanced_groups  # here: benchmarks/parallel.py's PyTorch worker has no bll_ref
    seq = sum(cost_at(costs, N))
    best = None
    for r in (1, 2, 4, 8, 16, 32, 64):
        s = ranks // r
        if s * r != ranks or s > n_blocks or s < 1 or N % r:
            continue
        sp = seq / predict_step(costs, balanced_groups(cost_at(costs, N), s), r, msg, pbytes, cores, copy_rates,
                                shared, opt_s=opt_s)
        if best is None or sp > best[2]:
            best = (s, r, sp)
    return best
