"""GPU kernels on CuPy arrays: per-call time and effective bandwidth against the GPU's copy rate.

Measures, in one run (float32, block outputs of (N, D) = (128, 1024) and (8192, 1024)):

- **limit**: the device-to-device copy bandwidth (cudaMemcpyAsync of 1 GiB, bytes read + written,
  median of CUDA-event-timed repeats);
- **kernels**: every loss kernel of ``bll_ref.losses.cuda`` (Eq. 8, S12, S13, the three Eq. 7 KLs,
  softmax cross-entropy on (N, 10) logits) and the Adam / SGD / plain SGD updates of
  ``bll_ref.gpu.optim_kernels``, device path (CuPy in, CuPy out, loss left on the device): per-call
  time = CUDA events around many back-to-back calls (median over repeats; when the host cannot
  launch as fast as the GPU runs, this is the launch overhead), the host's time per call (Python
  until the launch is queued), effective bandwidth = bytes the kernel must read + write / time,
  and its fraction of the copy bandwidth. At (128, 1024) each GPU result is compared with its CPU
  twin (``losses.kernels``, ``output``, ``optim.*_update_reference``): max |diff| / max |ref|;
- **launch paths**: one small kernel (plain SGD, 128 x 1024) launched the ordinary numba way
  (``kernel[grid, block, stream](cupy, ...)``), with arrays wrapped once beforehand
  (``cuda.as_cuda_array``), and through each path of ``losses.cuda.KernelLauncher`` (numba's
  ``_Kernel.launch``, ``cuda.core.launch``: the default, CuPy's ``Function``), with a CuPy
  ElementwiseKernel for reference.

    python benchmarks/cuda_kernels.py [--repeats 7] [--out DIR]

Writes cuda_kernels.{json,md} under DIR (default benchmarks/results). Without a usable GPU (or
under NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU) it prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPES = ((128, 1024), (8192, 1024))
N_CLASSES = 10


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed bursts per case (median)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON and markdown")
    return ap.parse_args()


def gpu_or_reason():
    """(cupy, None) when the GPU path can run, else (None, one-line reason)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None, "NUMBA_ENABLE_CUDASIM=1 is set: the simulator is not a GPU; unset it to benchmark"
    from bll_ref import backend
    try:
        return backend.require_cuda(), None
    except backend.DeviceError as exc:
        return None, str(exc)


def time_calls(cp, fn, calls, repeats):
    """(median device seconds per call, median host seconds per call) over ``repeats`` bursts of
    ``calls`` back-to-back calls: CUDA events around each burst, perf_counter until it is queued."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    dev, host = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) / calls)
        end.synchronize()
        dev.append(cp.cuda.get_elapsed_time(start, end) * 1e-3 / calls)
    return sorted(dev)[len(dev) // 2], sorted(host)[len(host) // 2]


def copy_bandwidth(cp, repeats, nbytes=1 << 30):
    """Device-to-device cudaMemcpyAsync of nbytes: bytes read + written per second."""
    src, dst = cp.ones(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
    t, _ = time_calls(cp, lambda: dst.data.copy_from_device_async(src.data, nbytes), 5, repeats)
    src = dst = None  # (not del: the lambda above closes over them)
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / t


def rel_err(got, ref):
    import numpy as np
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-300))


def loss_cases(cp, np, shape, check):
    """name -> (fn, bytes, error vs CPU or None) for the loss kernels at one shape."""
    from bll_ref.losses import cuda, kernels, output
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 3).astype(np.float32)
    b = (rng.standard_normal(shape) * 3).astype(np.float32)
    ca, cb = cp.asarray(a), cp.asarray(b)
    calls = {
        "bernoulli_eq8": lambda k, x, y: k.bernoulli_eq8(x, y, 0.5),
        "gaussian_s12": lambda k, x, y: k.gaussian_s12(x, y, 0.5),
        "poisson_s13": lambda k, x, y: k.poisson_s13(x, y, 0.5),
        "kl_ef bernoulli": lambda k, x, y: k.kl_ef_gradients("bernoulli", x, y),
        "kl_ef gaussian": lambda k, x, y: k.kl_ef_gradients("gaussian", x, y),
        "kl_ef poisson": lambda k, x, y: k.kl_ef_gradients("poisson", x, y),
    }
    out = {}
    for name, call in calls.items():
        err = None
        if check:
            got, ref = call(cuda, ca, cb), call(kernels, a, b)
            err = max([abs(float(got[0]) - ref[0]) / abs(ref[0])]
                      + [rel_err(cp.asnumpy(g), r) for g, r in zip(got[1:], ref[1:])])
        out[name] = (lambda call=call: call(cuda, ca, cb), 4 * a.nbytes, err)   # read a, b; write 2 gradients
    z = (rng.standard_normal((shape[0], N_CLASSES)) * 3).astype(np.float32)
    y = rng.integers(0, N_CLASSES, shape[0])
    cz, cy = cp.asarray(z), cp.asarray(y)
    err = None
    if check:
        loss, dz = cuda.softmax_cross_entropy(cz, cy)
        rl, rdz = output.softmax_cross_entropy(z, y)
        err = max(abs(float(loss) - rl) / abs(rl), rel_err(cp.asnumpy(dz), rdz))
    out[f"softmax_ce (N, {N_CLASSES})"] = (lambda: cuda.softmax_cross_entropy(cz, cy), 2 * z.nbytes + y.nbytes, err)
    return out


def optim_cases(cp, np, shape, check):
    """name -> (fn, bytes, error vs reference or None) for the optimiser updates at one shape."""
    from bll_ref.gpu import optim_kernels as ok
    from bll_ref.optim import adam_update_reference, sgd_update_reference
    rng = np.random.default_rng(1)
    n = shape[0] * shape[1]
    host = {k: rng.standard_normal(n).astype(np.float32) for k in ("p", "g", "m", "v", "vel")}
    host["v"] = np.abs(host["v"])
    d = {k: cp.asarray(v) for k, v in host.items()}
    lr, b1, b2, eps, wd, t = 1e-3, 0.9, 0.999, 1e-8, 1e-2, 5
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    adam_args = (lr / c1, b1, 1 - b1, b2, 1 - b2, 1 / math.sqrt(c2), eps, wd)
    errs = {"adam": None, "sgd momentum": None, "sgd plain": None}
    if check:
        p, m, v = (cp.asarray(host[k]) for k in ("p", "m", "v"))
        ok.adam(p, d["g"], m, v, *adam_args)
        rp, rm, rv = host["p"].copy(), host["m"].copy(), host["v"].copy()
        adam_update_reference(rp, host["g"], rm, rv, lr, b1, b2, eps, wd, t)
        errs["adam"] = max(rel_err(cp.asnumpy(x), r) for x, r in ((p, rp), (m, rm), (v, rv)))
        p, vel = cp.asarray(host["p"]), cp.asarray(host["vel"])
        ok.sgd(p, d["g"], vel, 0.1, 0.9, wd)
        rp, rvel = host["p"].copy(), host["vel"].copy()
        sgd_update_reference(rp, host["g"], rvel, 0.1, 0.9, wd)
        errs["sgd momentum"] = max(rel_err(cp.asnumpy(p), rp), rel_err(cp.asnumpy(vel), rvel))
        p = cp.asarray(host["p"])
        ok.sgd_plain(p, d["g"], 0.1, wd)
        rp = host["p"].copy()
        sgd_update_reference(rp, host["g"], None, 0.1, 0.0, wd)
        errs["sgd plain"] = rel_err(cp.asnumpy(p), rp)
    word = 4 * n
    return {
        "adam": (lambda: ok.adam(d["p"], d["g"], d["m"], d["v"], *adam_args), 7 * word, errs["adam"]),
        "sgd momentum": (lambda: ok.sgd(d["p"], d["g"], d["vel"], 0.1, 0.9, wd), 5 * word, errs["sgd momentum"]),
        "sgd plain": (lambda: ok.sgd_plain(d["p"], d["g"], 0.1, wd), 3 * word, errs["sgd plain"]),
    }


def launch_paths(cp, np, repeats, n=128 * 1024, calls=1000):
    """The same plain-SGD update launched five ways: (device s/call, host s/call) each."""
    from numba import cuda as nbcuda

    from bll_ref.gpu import optim_kernels as ok
    from bll_ref.losses.cuda import KernelLauncher
    p, g = cp.zeros(n, cp.float32), cp.ones(n, cp.float32)
    lr, wd = np.float32(1e-3), np.float32(0.0)
    grid = -(-n // ok.THREADS)
    ptr = cp.cuda.get_current_stream().ptr  # numba's own launch needs CuPy's stream as a numba stream
    stream = nbcuda.external_stream(ptr) if ptr else nbcuda.default_stream()
    k = ok._sgd_plain_kernel[grid, ok.THREADS, stream]
    pn, gn = nbcuda.as_cuda_array(p, sync=False), nbcuda.as_cuda_array(g, sync=False)
    elementwise = cp.ElementwiseKernel("T g, T lr, T wd", "T p", "p -= lr * (g + wd * p)", "bll_sgd_plain")

    default = KernelLauncher.path

    def via(path):
        def call():
            KernelLauncher.path = path
            try:
                ok.sgd_plain(p, g, 1e-3, 0.0)
            finally:
                KernelLauncher.path = default
        return call
    paths = {
        "numba kernel[grid, block, stream](cupy arrays)": lambda: k(p, g, n, lr, wd),
        "numba kernel[...](as_cuda_array views made once)": lambda: k(pn, gn, n, lr, wd),
        "KernelLauncher path numba: addresses through numba _Kernel.launch": via("numba"),
        "KernelLauncher path core: cuda.core.launch, cached config (default)": via("core"),
        "KernelLauncher path cupy: numba's cubin in CuPy's Function": via("cupy"),
        "CuPy ElementwiseKernel (reference)": lambda: elementwise(g, lr, wd, p),
    }
    return {name: time_calls(cp, fn, calls, repeats) for name, fn in paths.items()}


def write(out_dir, payload, md):
    from bll_ref.fileio import atomic_open, write_json_atomic
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "cuda_kernels.json"), payload)
    with atomic_open(os.path.join(out_dir, "cuda_kernels.md"), "w") as f:
        f.write(md + "\n")
    print(md)


def main():
    args = parse()
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    cp, why = gpu_or_reason()
    if cp is None:
        print(f"benchmarks/cuda_kernels.py: skipped, {why}")
        return 2
    import numpy as np
    from common import machine

    t_start = time.perf_counter()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    copy_bw = copy_bandwidth(cp, args.repeats)
    print(f"{gpu}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + written)", flush=True)

    results, rows = [], []
    for shape in SHAPES:
        check = shape == SHAPES[0]
        size = shape[0] * shape[1]
        calls = max(10, min(500, int(5e8 // (16 * size))))     # ~enough back-to-back calls to fill ~0.1 s
        cases = {**loss_cases(cp, np, shape, check), **optim_cases(cp, np, shape, check)}
        for name, (fn, nbytes, err) in cases.items():
            t_dev, t_host = time_calls(cp, fn, calls, args.repeats)
            bw = nbytes / t_dev
            r = {"kernel": name, "shape": list(shape), "dtype": "float32", "bytes": nbytes, "calls": calls,
                 "us_per_call": 1e6 * t_dev, "host_us_per_call": 1e6 * t_host, "GBps": bw / 1e9,
                 "fraction_of_copy": bw / copy_bw, "max_rel_diff_vs_cpu": err}
            results.append(r)
            row = (f"| {name} | {shape[0]}x{shape[1]} | {nbytes / 1e6:.2f} | {r['us_per_call']:.1f} | "
                   f"{r['host_us_per_call']:.1f} | {r['GBps']:.0f} | {100 * r['fraction_of_copy']:.0f} % | "
                   + (f"{err:.1e} |" if err is not None else "- |"))
            rows.append(row)
            print(row, flush=True)
    with warnings.catch_warnings(record=True) as caught:     # a launch path that fell back says so
        warnings.simplefilter("always", RuntimeWarning)
        paths = launch_paths(cp, np, args.repeats)
    fallbacks = sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)})
    path_rows = [f"| {name} | {1e6 * d:.1f} | {1e6 * h:.1f} |" for name, (d, h) in paths.items()]
    path_rows += [f"\nfell back: {m}" for m in fallbacks]
    for row in path_rows:
        print(row, flush=True)

    md = (f"GPU: {gpu} ({props['multiProcessorCount']} SMs); device-to-device copy (1 GiB cudaMemcpyAsync, "
          f"bytes read + written): **{copy_bw / 1e9:.0f} GB/s**.\n\n"
          "| kernel | N x D | MB moved | us/call (GPU) | host us/call | GB/s | of copy BW | max rel. diff vs CPU |\n"
          "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
          + f"\n\nfloat32, CuPy arrays in and out (loss left on the device); us/call = CUDA events around "
          f"back-to-back calls, median of {args.repeats} bursts (when the host is the bottleneck this is the "
          "launch overhead); host us/call = Python time until the call is queued; MB moved = bytes the kernel "
          "must read + write (loss kernels: 2 inputs + 2 gradients; Adam 7, SGD 5, plain SGD 3 words per "
          "parameter); softmax_ce rows are (N, 10) logits. Max rel. diff: against the CPU twin at 128x1024.\n\n"
          "Launch paths, plain SGD at 128x1024 float32 (1000 back-to-back calls):\n\n"
          "| launch | us/call (GPU) | host us/call |\n|---|---|---|\n" + "\n".join(path_rows))
    payload = {"machine": machine(), "gpu": gpu, "sm_count": props["multiProcessorCount"],
               "cupy": cp.__version__, "numba_cuda": importlib.metadata.version("numba-cuda"),
               "copy_GBps": copy_bw / 1e9, "repeats": args.repeats, "results": results,
               "launch_paths": {k: {"us_per_call": 1e6 * d, "host_us_per_call": 1e6 * h} for k, (d, h) in paths.items()},
               "launch_path_fallbacks": fallbacks,
               "wall_s": time.perf_counter() - t_start}
    write(args.out, payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
