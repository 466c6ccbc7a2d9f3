"""numba.cuda loss kernels (bll_ref.losses.cuda) against the Numba CPU kernels (bll_ref.losses.kernels).

Runs only where a CUDA GPU is present; anywhere else it prints one line saying why and exits 0.

For Eq. 8/9 (``bernoulli_eq8``) and the Gaussian KL / Eq. 7 (``kl_ef_gradients``), float32 and
float64, block outputs of (N, D) = (128, 1024), (1024, 1024) and (8192, 1024), interleaved:

- cpu        ``kernels.*`` (one fused pass, serial rows; ``parallel=None``: the wrapper's choice)
- gpu host   ``cuda.*`` on NumPy arrays: copies in, kernels, copies out (the drop-in path)
- gpu device ``cuda.*`` on device arrays: nothing crosses to the host (loss stays on the device);
             timed with ``cuda.synchronize()`` so the kernels' run time is counted
- gpu cupy   as gpu device, CuPy arrays in (``__cuda_array_interface__``), when CuPy is installed

Every GPU result is compared with the CPU kernel's (max |difference| relative to max |value|).

    python benchmarks/cuda_kernels.py [--repeats 50]

Writes benchmarks/results/cuda_kernels.{json,md}. ``--simulator-smoke`` runs the same code path
in the CUDA simulator on one tiny float32 shape and writes nothing (a check of this script, not a benchmark).
"""
from __future__ import annotations

import argparse
import os
import sys

SHAPES = ((128, 1024), (1024, 1024), (8192, 1024))
SMOKE_SHAPES = ((2, 40),)


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--simulator-smoke", action="store_true",
                    help="tiny shapes in the CUDA simulator, results not written")
    return ap.parse_args()


def gpu_missing(smoke):
    """None when kernels can launch, else the one-line reason."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and not smoke:
        return "NUMBA_ENABLE_CUDASIM=1 is set: the simulator is not a GPU; unset it to benchmark"
    try:
        from numba import cuda
    except Exception as exc:      # pragma: no cover - stripped-down numba builds
        return f"numba.cuda does not import ({exc})"
    try:
        if not cuda.is_available():
            return "no CUDA GPU found (numba.cuda.is_available() is False)"
    except Exception as exc:      # pragma: no cover - driver errors
        return f"no usable CUDA GPU ({exc})"
    return None


def main():
    args = parse()
    if args.simulator_smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"      # before numba.cuda is first imported
    why = gpu_missing(args.simulator_smoke)
    if why is not None:
        print(f"benchmarks/cuda_kernels.py: skipped, {why}")
        return 0
    import time

    import numpy as np
    from numba import cuda as nbcuda

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from common import interleaved, machine, write

    from bll_ref.losses import cuda, kernels
    try:
        import cupy
    except Exception:
        cupy = None

    shapes, repeats = (SMOKE_SHAPES, 1) if args.simulator_smoke else (SHAPES, args.repeats)
    dtypes = (np.float32,) if args.simulator_smoke else (np.float32, np.float64)
    if args.simulator_smoke:
        device_name = "CUDA simulator"
    else:
        name = nbcuda.get_current_device().name
        device_name = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    estimators = {
        "bernoulli_eq8": (lambda k, a, b: k.bernoulli_eq8(a, b, 0.5)),
        "gaussian_kl_ef": (lambda k, a, b: k.kl_ef_gradients("gaussian", a, b)),
    }
    rng = np.random.default_rng(0)
    rows, results = [], []
    for shape in shapes:
        for dtype in dtypes:
            a = (rng.standard_normal(shape) * 3).astype(dtype)
            b = (rng.standard_normal(shape) * 3).astype(dtype)
            da, db = nbcuda.to_device(a), nbcuda.to_device(b)
            ca, cb = (cupy.asarray(a), cupy.asarray(b)) if cupy is not None else (None, None)
            for name, call in estimators.items():
                ref = call(kernels, a, b)

                def on_device(x, y, call=call):
                    out = call(cuda, x, y)
                    nbcuda.synchronize()
                    return out
                fns = {"cpu": lambda: call(kernels, a, b), "gpu host": lambda: call(cuda, a, b),
                       "gpu device": lambda: on_device(da, db)}
                if cupy is not None:
                    fns["gpu cupy"] = lambda: on_device(ca, cb)
                med, _ = interleaved(fns, repeats=repeats, warmup=0 if args.simulator_smoke else 3)
                got = {"gpu host": call(cuda, a, b), "gpu device": on_device(da, db)}
                got["gpu device"] = [float(got["gpu device"][0].copy_to_host()[0])] + \
                    [g.copy_to_host() for g in got["gpu device"][1:]]
                err = {k: max([abs(v[0] - ref[0]) / max(abs(ref[0]), 1e-300)]
                              + [float(np.max(np.abs(x.astype(np.float64) - y)) / max(np.max(np.abs(y)), 1e-300))
                                 for x, y in zip(v[1:], ref[1:])]) for k, v in got.items()}
                n_bytes = 4 * a.nbytes                 # read a, b; write two gradients
                r = {"estimator": name, "shape": list(shape), "dtype": np.dtype(dtype).name,
                     "median_s": med, "max_rel_err_vs_cpu": err,
                     "device_GBps": n_bytes / med["gpu device"] / 1e9}
                results.append(r)
                row = (f"| {name} | {shape[0]}x{shape[1]} | {r['dtype']} | {1e3 * med['cpu']:.3f} | "
                       f"{1e3 * med['gpu host']:.3f} | {1e3 * med['gpu device']:.3f} | "
                       + (f"{1e3 * med['gpu cupy']:.3f} | " if cupy is not None else "- | ")
                       + f"{med['cpu'] / med['gpu device']:.1f}x | {r['device_GBps']:.0f} | "
                       f"{max(err.values()):.1e} |")
                rows.append(row)
                print(row, flush=True)
    md = ("| estimator | N x D | dtype | cpu ms | gpu host ms | gpu device ms | gpu cupy ms | cpu / device | "
          "device GB/s | max rel. diff vs cpu |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
          + f"\n\nGPU: {device_name}; CPU kernels: bll_ref.losses.kernels (NUMBA_NUM_THREADS="
          f"{os.environ.get('NUMBA_NUM_THREADS', 'default')}); medians of {repeats} interleaved calls. "
          "gpu host includes the copies to and from the device; gpu device keeps inputs and outputs on the "
          "device (loss too) and synchronises after each call.")
    if args.simulator_smoke:
        print(md)
        print(f"simulator smoke run: {len(results)} cases, results not written")
        return 0
    payload = {"machine": machine(), "gpu": device_name, "cupy": getattr(cupy, "__version__", None),
               "repeats": repeats, "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    write("cuda_kernels", payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
