"""NumPy reference (bll_ref.losses.local) vs fused Numba kernels (bll_ref.losses.kernels) for every
local estimator, at batch 128 x 1024 units, float32 and float64.

Two interleaved groups per case, so that machine drift hits both sides alike:
  A. reference vs kernel as a user calls it (parallel=None: serial at this size) -> the ratio;
  B. serial vs prange kernel (parallel=True), kept apart from A because OpenMP worker threads
     that spin after a parallel region slow down whatever runs next on a 2-core machine.
Groups A run first for every case, then B, then the GEMM rate.
A final group times 1024 x 1024 float32 (PARALLEL_MIN_SIZE) to show whether prange pays there.
Compilation happens (or the Numba cache loads) before timing.

    python benchmarks/bench_kernels.py [--repeats 60]

Writes benchmarks/results/kernels.{json,md}; prints the table and the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_gflops, interleaved, machine, write  # noqa: E402

from bll_ref.losses import kernels, local  # noqa: E402

TARGET = 3.0  # required speed-up of the kernel over the reference at 128 x 1024 float32

CASES = {  # name -> (call(module, a, b, **kw))
    "kl_ef_gradients bernoulli": lambda mod, a, b, **kw: mod.kl_ef_gradients("bernoulli", a, b, **kw),
    "kl_ef_gradients gaussian": lambda mod, a, b, **kw: mod.kl_ef_gradients("gaussian", a, b, **kw),
    "kl_ef_gradients poisson": lambda mod, a, b, **kw: mod.kl_ef_gradients("poisson", a, b, **kw),
    "bernoulli_eq8": lambda mod, a, b, **kw: mod.bernoulli_eq8(a, b, 0.5, **kw),
    "gaussian_s12": lambda mod, a, b, **kw: mod.gaussian_s12(a, b, 0.5, **kw),
    "poisson_s13": lambda mod, a, b, **kw: mod.poisson_s13(a, b, 0.5, **kw),
}


def inputs(n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * 2).astype(dtype), (rng.standard_normal((n, d)) * 2).astype(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--d", type=int, default=1024)
    args = ap.parse_args()

    load_before = os.getloadavg()
    data = {dt: inputs(args.n, args.d, dt) for dt in (np.float32, np.float64)}
    rows = []
    # A: reference vs default kernel, every case, before anything has started a thread pool
    for dtype, (a, b) in data.items():
        for name, call in CASES.items():
            med, _ = interleaved({"reference": lambda: call(local, a, b), "kernel": lambda: call(kernels, a, b)},
                                 repeats=args.repeats)
            rows.append({"estimator": name, "dtype": np.dtype(dtype).name, "shape": [args.n, args.d],
                         "reference_us": med["reference"] * 1e6, "kernel_us": med["kernel"] * 1e6,
                         "ratio": med["reference"] / med["kernel"]})
            r = rows[-1]
            print(f"{name:28s} {r['dtype']:8s} reference {r['reference_us']:8.0f} us  kernel "
                  f"{r['kernel_us']:7.0f} us  ratio {r['ratio']:5.1f}x", flush=True)
    # B: serial vs prange kernel
    for r in rows:
        a, b = data[np.dtype(r["dtype"]).type]
        call = CASES[r["estimator"]]
        med, _ = interleaved({"serial": lambda: call(kernels, a, b, parallel=False),
                              "parallel": lambda: call(kernels, a, b, parallel=True)}, repeats=args.repeats)
        r["serial_us"], r["parallel_us"] = med["serial"] * 1e6, med["parallel"] * 1e6

    big = []
    a, b = inputs(1024, 1024, np.float32)
    for name in ("bernoulli_eq8", "kl_ef_gradients poisson", "gaussian_s12"):
        call = CASES[name]
        med, _ = interleaved({"serial": lambda: call(kernels, a, b, parallel=False),
                              "parallel": lambda: call(kernels, a, b, parallel=True)},
                             repeats=max(10, args.repeats // 4))
        big.append({"estimator": name, "dtype": "float32", "shape": [1024, 1024],
                    "serial_us": med["serial"] * 1e6, "parallel_us": med["parallel"] * 1e6})
    gflops = gemm_gflops()  # last: OpenBLAS threads spin after a GEMM, too
    load_after = os.getloadavg()

    f32 = [r for r in rows if r["dtype"] == "float32"]
    worst = min(r["ratio"] for r in f32)
    info = {"numba": numba.__version__, "threads": numba.get_num_threads(),
            "threading_layer": numba.threading_layer(), "PARALLEL_MIN_SIZE": kernels.PARALLEL_MIN_SIZE,
            "PARALLEL_MIN_THREADS": kernels.PARALLEL_MIN_THREADS,
            "gemm_f32_gflops": gflops, "repeats": args.repeats, "target_ratio_f32": TARGET,
            "min_ratio_f32": worst, "loadavg_before": load_before, "loadavg_after": load_after,
            **machine()}

    md = [f"# Local estimators: NumPy reference vs fused Numba kernel ({args.n} x {args.d})", "",
          f"Median of {args.repeats} interleaved calls each, wrapper included (validation, output allocation). "
          f"Machine: {info['cpus']} CPUs, float32 1024^3 GEMM {gflops:.0f} GFLOP/s, numba {info['numba']} "
          f"({info['threads']} threads, {info['threading_layer']}), 1-min load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after (other jobs share the machine). Kernel = the default (serial below "
          f"{kernels.PARALLEL_MIN_SIZE} elements or {kernels.PARALLEL_MIN_THREADS} threads); "
          "the prange column is the same kernel forced parallel, "
          "timed against the serial one in a separate interleaved group.", "",
          "| estimator | dtype | reference (us) | kernel (us) | speed-up | serial (us) | prange (us) |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['estimator']} | {r['dtype']} | {r['reference_us']:.0f} | {r['kernel_us']:.0f} | "
                  f"{r['ratio']:.1f}x | {r['serial_us']:.0f} | {r['parallel_us']:.0f} |")
    md += ["", "Above the parallel threshold (1024 x 1024 float32):", "",
           "| estimator | serial (us) | prange (us) | prange speed-up |", "|---|---:|---:|---:|"]
    for r in big:
        md.append(f"| {r['estimator']} | {r['serial_us']:.0f} | {r['parallel_us']:.0f} | "
                  f"{r['serial_us'] / r['parallel_us']:.2f}x |")
    md += ["", f"Smallest float32 speed-up: {worst:.1f}x (target {TARGET:.0f}x): "
               f"{'met' if worst >= TARGET else 'NOT met'}."]
    write("kernels", {"version": 1, "info": info, "results": rows, "large": big}, "\n".join(md))


if __name__ == "__main__":
    main()
