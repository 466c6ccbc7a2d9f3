"""Which worker trains which blocks: contiguous groups balanced by each learner's measured step time."""
from __future__ import annotations

import copy
import time

import numpy as np

__all__ = ["measure_learner_seconds", "balanced_groups", "blocks_label", "describe",
           "pipeline_seconds_per_step"]


def measure_learner_seconds(method, x, y, repeats=3) -> list[float]:
    """Median seconds of forward + update per learner on the batch (x, y), measured on a deep
    copy of each learner in turn, so the run itself is not changed, and at most one learner's
    copy exists at a time: an MPI rank 0 plans before it lets go of the other stages' learners,
    and a copy of the whole model, its optimiser moments written, set that rank's peak memory."""
    Y, h, costs = method.one_hot(y), x, []
    for learner in method.learners:
        copied, times = copy.deepcopy(learner), []
        for _ in range(repeats + 1):  # the first round compiles kernels and warms caches
            t = time.perf_counter()
            h_next = copied.forward(h)
            copied.update(y, Y)
            times.append(time.perf_counter() - t)
        costs.append(float(np.median(times[1:])))
        h, copied = h_next, None  # this copy goes before the next one is made
    return costs


def balanced_groups(costs, workers) -> list[list[int]]:
    """Split learner indices 0..K-1 into ``workers`` contiguous non-empty groups minimising the
    largest group cost (exact dynamic programme; K is small)."""
    K = len(costs)
    if not 1 <= workers <= K:
        raise ValueError(f"workers must be between 1 and the number of blocks ({K}), got {workers}")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    INF = float("inf")
    # best[w][i]: smallest max-group cost of the first i learners in w groups; cut[w][i]: last cut
    best = [[INF] * (K + 1) for _ in range(workers + 1)]
    cut = [[0] * (K + 1) for _ in range(workers + 1)]
    best[0][0] = 0.0
    for w in range(1, workers + 1):
        for i in range(w, K + 1):
            for j in range(w - 1, i):
                c = max(best[w - 1][j], prefix[i] - prefix[j])
                if c < best[w][i]:
                    best[w][i], cut[w][i] = c, j
    groups, i = [], K
    for w in range(workers, 0, -1):
        j = cut[w][i]
        groups.insert(0, list(range(j, i)))
        i = j
    return groups


def blocks_label(group) -> str:
    """'block 3' or 'blocks 1-2' for a group of 0-based learner indices (printed 1-based)."""
    return f"block {group[0] + 1}" if len(group) == 1 else f"blocks {group[0] + 1}-{group[-1] + 1}"


def describe(groups, costs=None) -> str:
    """'worker 0: blocks 1-2 (9.1 ms/step); worker 1: blocks 3-4 (8.7 ms/step)'."""
    parts = []
    for w, g in enumerate(groups):
        cost = f" ({1e3 * sum(costs[k] for k in g):.1f} ms/step)" if costs is not None else ""
        parts.append(f"worker {w}: {blocks_label(g)}{cost}")
    return "; ".join(parts)


def pipeline_seconds_per_step(costs, groups, message_seconds=0.0) -> float:
    """Pipeline model: in steady state a step takes as long as the slowest group plus the time
    it spends sending its activations on."""
    return max(sum(costs[k] for k in g) for g in groups) + message_seconds
