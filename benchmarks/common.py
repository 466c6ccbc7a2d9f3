"""Shared helpers for benchmark scripts: machine GEMM rate, interleaved timing, JSON + markdown."""
from __future__ import annotations

import os
import platform
import time

import numpy as np

from bll_ref.fileio import atomic_open, write_json_atomic

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gemm_gflops(n=1024, repeats=10, dtype=np.float32):
    """Median float32 n^3 GEMM rate of this machine's BLAS, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / np.median(times) / 1e9


def interleaved(fns: dict, repeats=30, warmup=3):
    """Time several callables round-robin (so machine drift hits all alike); medians in seconds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}, times


def interleaved_bursts(fns: dict, repeats=30, burst=4, warmup=3):
    """Round-robin like :func:`interleaved`, but each contender runs ``burst`` steps in a row per
    round. The first step of a burst follows another contender's work, which has evicted this
    one's weights and optimiser state from the caches ("cold"); the others follow a step of the
    same model, as in training ("warm"). Returns (warm medians, cold medians) in seconds."""
    if burst < 2:
        raise ValueError(f"burst must be >= 2 (one cold and at least one warm step), got {burst}")
    for f in fns.values():
        for _ in range(warmup):
            f()
    warm, cold = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            for i in range(burst):
                t = time.perf_counter()
                f()
                (cold if i == 0 else warm)[k].append(time.perf_counter() - t)
    return ({k: float(np.median(v)) for k, v in warm.items()},
            {k: float(np.median(v)) for k, v in cold.items()})


def machine():
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(name, payload, table_md, out=None):
    """Write <out>/<name>.json and <out>/<name>.md (default out: results/); print the markdown."""
    out = out or RESULTS
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, f"{name}.json"), payload)
    with atomic_open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table_md + "\n")
    print(table_md)
