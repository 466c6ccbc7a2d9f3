"""bll_ref.gpu.layer_kernels (numba.cuda twins of bll_ref.layers.kernels), on a machine without a GPU.

Two checks, each in its own subprocess (both start when the first test needs one, and run side
by side):

* **PTX**: every ``@cuda.jit`` kernel of the modules (``conv_kernels``, ``norm_kernels``, which
  ``layer_kernels`` gathers), compiled to PTX with each signature of ``PTX_SIGNATURES`` for compute capabilities 9.0 (H100/H200) and 7.5, in a normal process
  (``NUMBA_ENABLE_CUDASIM=0``). NVVM rejects code the simulator runs happily (builtin
  ``max`` / ``min`` once did), so this is the check that stands in for the device here.
* **semantics**: in the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` before numba.cuda is first
  imported, so a separate process), every GPU function against the CPU kernel of the same name
  on random float32 / float64 inputs with odd sizes (N=3, C=5, H=W=7, D=37), |x| up to 1e3,
  outputs poisoned before each launch (NaN, or two different fills for bool / int outputs) and
  launched twice (the bits must agree). The simulator runs a Python thread per GPU thread, so
  the grids are capped at 2 blocks (which exercises the grid-stride loops) and the reductions
  use 32-thread blocks (set on ``conv_kernels``, where every launch reads them); one case of each keeps the production sizes. Also there: leading-axis
  views (Conv2d's chunks) read and written in place, and a ValueError naming the argument for a
  strided array, a wrong dtype or a host array (the launcher indexes flat C-order buffers).

A third check runs only on a GPU: the CuPy path (``KernelLauncher``'s raw addresses, a side
stream) against the CPU kernels.
"""
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_cuda_kernels import SIM_ERROR_HELPER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PTX_CODE = r'''
import json, sys
from numba import cuda
from numba.cuda.dispatcher import CUDADispatcher
from bll_ref.gpu import conv_kernels, layer_kernels as G, norm_kernels

# the public face and the modules whose kernels it gathers: every kernel of each must be listed
found, failures = {}, []
for mod in (G, conv_kernels, norm_kernels):
    for n, v in vars(mod).items():
        if isinstance(v, CUDADispatcher) and not v.targetoptions.get("device", False):
            if found.setdefault(n, v) is not v:
                failures.append(f"two different kernels named {n} ({mod.__name__})")
kernels = sorted(found)
compiled = 0
for name, sigs in G.PTX_SIGNATURES.items():
    for key, sig in sigs.items():
        for cc in ((9, 0), (7, 5)):
            try:
                ptx, _ = cuda.compile_ptx(found[name].py_func, sig, cc=cc)
                assert ".entry" in ptx
                compiled += 1
            except Exception as exc:
                failures.append(f"{name} {key} {sig} cc={cc}: {type(exc).__name__}: {str(exc)[-2000:]}")
print(json.dumps({"kernels": kernels, "listed": sorted(G.PTX_SIGNATURES),
                  "n_sigs": {n: len(s) for n, s in G.PTX_SIGNATURES.items()},
                  "compiled": compiled, "failures": failures}))
'''

_SIM_CODE = r'''
import json, sys, numpy as np
sys.setswitchinterval(5e-5)  # the simulator's block manager polls its threads: 5 ms slices idle ~half the time
from numba import cuda
from bll_ref.layers import kernels as K
from bll_ref.gpu import conv_kernels as L  # the launch settings every layer kernel reads
from bll_ref.gpu import layer_kernels as G

assert cuda.is_available()
PROD = (L.MAX_BLOCKS, L.REDUCE_THREADS)
rng = np.random.default_rng(0)
report = {}
POISON = {"f": (np.nan, np.nan), "b": (True, False), "i": (99, -7)}


def launch(name, args, outs, fill):
    dev = []
    for i, a in enumerate(args):
        if not isinstance(a, np.ndarray):
            dev.append(a)
        elif i in outs:
            dev.append(cuda.to_device(np.full_like(a, POISON[a.dtype.kind][fill])))
        else:
            dev.append(cuda.to_device(a))
    getattr(G, name)(*dev)
    return [dev[i].copy_to_host() for i in outs]


def rel_err(g, r):
    if g.dtype.kind != "f":
        return 0.0 if np.array_equal(g, r) else float("inf")
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    if not np.array_equal(nan_r, nan_g):
        return float("inf")        # an output left unwritten (NaN poison), or a NaN lost
    ok = ~nan_r
    if not ok.any():
        return 0.0
    d = np.abs(g[ok].astype(np.float64) - r[ok])
    return float(d.max() / max(np.abs(r[ok]).max(), 1e-300))


def case(key, name, args, outs, prod=False):
    """CPU kernel on copies of args vs the GPU function, twice (two poison fills)."""
    L.MAX_BLOCKS, L.REDUCE_THREADS = PROD if prod else (2, 32)
    ref = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    getattr(K, name)(*ref)
    runs = [launch(name, args, outs, fill) for fill in (0, 1)]
    report[key] = {
        "err": max(rel_err(g, ref[i]) for g, i in zip(runs[0], outs)),
        "exact": all(np.array_equal(g, ref[i], equal_nan=g.dtype.kind == "f") for g, i in zip(runs[0], outs)),
        "deterministic": all(a.tobytes() == b.tobytes() for a, b in zip(*runs)),
        # for a failure's message: per output argument, how many elements differ between the runs
        "differing": {i: int(np.count_nonzero(a.view(np.uint8) != b.view(np.uint8))) for i, a, b in zip(outs, *runs)
                      if a.tobytes() != b.tobytes()},
    }
    return ref


def extreme(shape, dt, offset=0.0):
    """normal * 300 clipped to +-1e3 (plus offset), with exact zeros and the clip values in it"""
    x = np.clip(rng.standard_normal(shape) * 300, -1e3, 1e3) + offset
    f = x.reshape(-1)
    f[:4] = [0.0, 1e3, -1e3, -0.0][:f.size]
    return x.astype(dt)


def conv_out_size(H, W, kh, kw, sh, sw, ph, pw):
    return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1


N, C, H, W = 3, 5, 7, 7
for dt in (np.float32, np.float64):
    d = dt.__name__
    # LeakyReLU / ReLU on 735 values
    x = extreme(N * C * H * W, dt)
    dy = extreme(x.size, dt)
    for slope in (0.1, 0.0):
        e = np.empty_like(x)
        _, _, y, mask = case(f"leaky_forward_{slope}_{d}", "leaky_relu_forward_kernel",
                             [x, dt(slope), e, np.empty(x.shape, np.bool_)], (2, 3), prod=slope == 0.0)
        case(f"leaky_backward_{slope}_{d}", "leaky_relu_backward_kernel", [dy, mask, dt(slope), e], (3,))

    # im2col / col2im: 3x3 stride 1 and 2 with padding 1, 1x1, and 2x3 with stride (2, 1)
    x4 = extreme((N, C, H, W), dt)
    for kh, kw, sh, sw, ph, pw in ((3, 3, 1, 1, 1, 1), (3, 3, 2, 2, 1, 1), (1, 1, 1, 1, 0, 0), (2, 3, 2, 1, 0, 1)):
        Ho, Wo = conv_out_size(H, W, kh, kw, sh, sw, ph, pw)
        geo = (kh, kw, sh, sw, ph, pw, Ho, Wo)
        tag = "x".join(map(str, geo[:6]))
        cols = np.empty((C * kh * kw, N * Ho * Wo), dt)
        case(f"im2col_{tag}_{d}", "im2col_kernel", [x4, *geo, cols], (9,), prod=tag == "1x1x1x1x0x0")
        case(f"col2im_{tag}_{d}", "col2im_kernel", [extreme(cols.shape, dt), *geo, np.empty_like(x4)], (9,),
             prod=tag == "3x3x1x1x1x1")

    # Conv2d output and dy layouts, with and without bias (O = 5, P = 49)
    P = H * W
    y2, dy3 = extreme((C, N * P), dt), extreme((N, C, P), dt)
    for nb in (C, 0):
        case(f"conv_out_bias{nb}_{d}", "conv_out_kernel", [y2, extreme(nb, dt), np.empty((N, C, P), dt)], (2,))
        case(f"conv_dy_bias{nb}_{d}", "conv_dy_kernel", [dy3, np.empty((C, N * P), dt), np.empty(nb, dt)], (1, 2))

    # LayerNorm rows: D = 37 (32-thread blocks), and D = 300 with the production 256 threads
    for M, D, prod in ((6, 37, False), (2, 300, True)):
        xr = extreme((M, D), dt, offset=500.0)
        _, _, xhat, inv_std = case(f"layer_norm_forward_D{D}_{d}", "layer_norm_forward_kernel",
                                   [xr, 1e-5, np.empty_like(xr), np.empty(M, dt)], (2, 3), prod=prod)
        case(f"layer_norm_backward_D{D}_{d}", "layer_norm_backward_kernel",
             [extreme((M, D), dt), xhat, inv_std, np.empty_like(xr)], (3,), prod=prod)

    # BatchNorm on (N, C, P): statistics, apply (float64 batch statistics or running ones in dt),
    # backward with batch statistics and frozen
    x3 = extreme((N, C, P), dt, offset=300.0)
    _, mean, var = case(f"batch_norm_stats_{d}", "batch_norm_stats_kernel", [x3, np.empty(C), np.empty(C)], (1, 2))
    inv_std = (1 / np.sqrt(var.astype(dt) + dt(1e-5))).astype(dt)
    gamma, beta = extreme(C, dt), extreme(C, dt)
    for mtype in (np.float64, dt):
        out = case(f"batch_norm_apply_mean_{mtype.__name__}_{d}", "batch_norm_apply_kernel",
                   [x3, mean.astype(mtype), inv_std, gamma, beta, np.empty_like(x3), np.empty_like(x3)], (5, 6))
    xhat3 = out[5]
    for batch in (True, False):
        case(f"batch_norm_backward_{batch}_{d}", "batch_norm_backward_kernel",
             [dy3, xhat3, gamma, inv_std, batch, np.empty_like(x3), np.empty(C), np.empty(C)], (5, 6, 7))

    # MaxPool2d: 2x2 / 3x3 stride 2 (overlapping windows); random, tied (small integers), and a NaN
    ties = rng.integers(-2, 3, (N, C, H, W)).astype(dt)
    nan = extreme((N, C, H, W), dt)
    nan[0, 0, 1, 1] = nan[1, 2, 4, 5] = np.nan
    for kh, sh in ((2, 2), (3, 2)):
        Ho = (H - kh) // sh + 1
        for name, xin in (("random", x4), ("ties", ties), ("nan", nan)):
            _, _, _, _, _, y, arg = case(f"max_pool_forward_{kh}x{kh}s{sh}_{name}_{d}", "max_pool_forward_kernel",
                                         [xin, kh, kh, sh, sh, np.empty((N, C, Ho, Ho), dt),
                                          np.empty((N, C, Ho, Ho), np.int8)], (5, 6), prod=name == "random")
            case(f"max_pool_backward_{kh}x{kh}s{sh}_{name}_{d}", "max_pool_backward_kernel",
                 [extreme(y.shape, dt), arg, kh, sh, sh, np.empty_like(xin)], (5,), prod=name == "random")
        arg32 = arg.astype(np.int32)  # MaxPool2d's arg is int32 from 128 window offsets
        case(f"max_pool_backward_{kh}x{kh}s{sh}_int32_{d}", "max_pool_backward_kernel",
             [extreme(y.shape, dt), arg32, kh, sh, sh, np.empty_like(xin)], (5,))

# leading-axis slices (Conv2d's per-chunk y[s:e], dy[s:e], dx[s:e]): the kernels get the view's
# first element, write only inside it and leave the rest of the array alone
L.MAX_BLOCKS, L.REDUCE_THREADS = 2, 32
views = {}
P = H * W
y2, dy3 = extreme((C, 2 * P), np.float64), extreme((N, C, P), np.float64)
ref_out = np.full((N, C, P), np.nan)
bias = extreme(C, np.float64)
K.conv_out_kernel(y2, bias, ref_out[1:3])
out = cuda.to_device(np.full((N, C, P), np.nan))
G.conv_out_kernel(cuda.to_device(y2), cuda.to_device(bias), out[1:3])
views["conv_out_into_slice"] = bool(np.array_equal(out.copy_to_host(), ref_out, equal_nan=True))
ref_dy2, ref_db = np.empty((C, 2 * P)), np.empty(C)
K.conv_dy_kernel(dy3[1:3], ref_dy2, ref_db)
d_dy2, d_db = cuda.to_device(np.full((C, 2 * P), np.nan)), cuda.to_device(np.full(C, np.nan))
G.conv_dy_kernel(cuda.to_device(dy3)[1:3], d_dy2, d_db)
views["conv_dy_from_slice"] = bool(np.array_equal(d_dy2.copy_to_host(), ref_dy2)
                                   and np.max(np.abs(d_db.copy_to_host() - ref_db)) <= 1e-12 * np.max(np.abs(ref_db)))
dcols = extreme((C * 9, 2 * P), np.float64)
ref_dx = np.full((N, C, H, W), np.nan)
K.col2im_kernel(dcols, 3, 3, 1, 1, 1, 1, H, W, ref_dx[1:3])
d_dx = cuda.to_device(np.full((N, C, H, W), np.nan))
G.col2im_kernel(cuda.to_device(dcols), 3, 3, 1, 1, 1, 1, H, W, d_dx[1:3])
views["col2im_into_slice"] = bool(np.array_equal(d_dx.copy_to_host(), ref_dx, equal_nan=True))
report["views"] = views


x = cuda.to_device(extreme(16, np.float32))
y8, m8 = cuda.to_device(np.empty(8, np.float32)), cuda.to_device(np.empty(8, np.bool_))
x4 = extreme((N, C, H, W), np.float32)
cols64 = cuda.to_device(np.empty((C, N * P)))
report["errors"] = {
    "strided": error(lambda: G.leaky_relu_forward_kernel(x[::2], np.float32(0.1), y8, m8)),
    "strided_output": error(lambda: G.leaky_relu_backward_kernel(x[:8], m8, np.float32(0.1), cuda.to_device(np.empty(16, np.float32))[::2])),
    "dtype": error(lambda: G.im2col_kernel(cuda.to_device(x4), 1, 1, 1, 1, 0, 0, H, W, cols64)),
    "mask_dtype": error(lambda: G.leaky_relu_forward_kernel(x[:8], np.float32(0.1), y8, cuda.to_device(np.empty(8, np.int8)))),
    "host": error(lambda: G.leaky_relu_forward_kernel(np.zeros(8, np.float32), np.float32(0.1), y8, m8)),
}
print(json.dumps(report))
'''


def _start(code, sim):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               NUMBA_ENABLE_CUDASIM="1" if sim else "0")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _report(proc, what):
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the {what} subprocess ran past 600 s")
    assert proc.returncode == 0, f"the {what} subprocess failed:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def _procs():
    importlib.metadata.version("numba-cuda")  # PackageNotFoundError: the test extra is incomplete
    procs = {"ptx": _start(_PTX_CODE, sim=False), "sim": _start(SIM_ERROR_HELPER + _SIM_CODE, sim=True)}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def ptx(_procs):
    return _report(_procs["ptx"], "PTX compilation")


@pytest.fixture(scope="module")
def sim(_procs):
    return _report(_procs["sim"], "CUDA simulator")


def test_numba_cuda_is_installed():
    # the PTX check needs the real numba.cuda target: without numba-cuda it must fail, not skip
    try:
        importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("numba-cuda is not installed; pip install numba-cuda (part of the test extra)")


def test_every_kernel_has_ptx_signatures(ptx):
    assert ptx["kernels"], "no @cuda.jit kernels found in bll_ref.gpu.conv_kernels / norm_kernels"
    assert ptx["kernels"] == ptx["listed"], "PTX_SIGNATURES must list exactly the module's kernels"
    # float32 and float64 at least
    assert all(n >= 2 for n in ptx["n_sigs"].values()), ptx["n_sigs"]


def test_every_kernel_compiles_to_ptx_for_sm90_and_sm75(ptx):
    assert not ptx["failures"], "\n".join(ptx["failures"])
    assert ptx["compiled"] == 2 * sum(ptx["n_sigs"].values())


# outputs that only copy, select, compare or add in the CPU kernel's order: equal bit for bit
_EXACT = ("leaky_", "im2col_", "col2im_", "conv_out_", "max_pool_")
_KEYS = ["leaky_forward_0.1", "leaky_forward_0.0", "leaky_backward_0.1", "leaky_backward_0.0",
         *[f"{k}_{g}" for k in ("im2col", "col2im") for g in ("3x3x1x1x1x1", "3x3x2x2x1x1", "1x1x1x1x0x0", "2x3x2x1x0x1")],
         "conv_out_bias5", "conv_out_bias0", "conv_dy_bias5", "conv_dy_bias0",
         "layer_norm_forward_D37", "layer_norm_backward_D37", "layer_norm_forward_D300", "layer_norm_backward_D300",
         "batch_norm_stats", "batch_norm_apply_mean_float64",
         "batch_norm_backward_True", "batch_norm_backward_False",
         *[f"max_pool_{p}_{g}_{x}" for p in ("forward", "backward") for g in ("2x2s2", "3x3s2")
           for x in ("random", "ties", "nan")],
         "max_pool_backward_2x2s2_int32", "max_pool_backward_3x3s2_int32"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("key", _KEYS)
def test_gpu_kernel_matches_cpu_kernel_and_writes_every_output(sim, key, dtype):
    r = sim[f"{key}_{dtype}"]
    if key.startswith(_EXACT) or key.startswith("conv_dy_bias0"):
        assert r["exact"], r
    # float64: sums in another order; float32: the same, rounded once more to float32
    assert r["err"] <= (1e-12 if dtype == "float64" else 1e-5), r


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_norm_apply_takes_running_statistics_in_the_layer_dtype(sim, dtype):
    r = sim[f"batch_norm_apply_mean_{dtype}_{dtype}"]
    assert r["err"] <= (1e-12 if dtype == "float64" else 1e-5), r


def test_two_launches_give_identical_bits(sim):
    cases = {k: r for k, r in sim.items() if "deterministic" in r}
    assert all(r["deterministic"] for r in cases.values()), {k: r["differing"] for k, r in cases.items()
                                                             if not r["deterministic"]}


def test_leading_axis_slices_are_read_and_written_in_place(sim):
    # the launcher passes the view's first element: Conv2d hands its chunks over as y[s:e]
    assert sim["views"] == {"conv_out_into_slice": True, "conv_dy_from_slice": True, "col2im_into_slice": True}


@pytest.mark.parametrize("case, words", [
    ("strided", ["leaky_relu_forward_kernel", "x must be a C-contiguous", "(8,)"]),
    ("strided_output", ["leaky_relu_backward_kernel", "dx must be a C-contiguous"]),
    ("dtype", ["im2col_kernel", "x float32, cols float32", "got (x float32, cols float64)"]),
    ("mask_dtype", ["mask bool", "mask int8"]),
    ("host", ["CuPy arrays or all as numba device arrays", "ndarray"]),
])
def test_bad_arrays_raise_a_value_error_naming_the_argument(sim, case, words):
    msg = sim["errors"][case]
    assert msg is not None and msg.startswith("ValueError: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_simulator_covered_every_gpu_function(sim):
    from bll_ref.layers import kernels as K
    public = [n for n in dir(K) if n.endswith("_kernel")]
    covered = {k.rsplit("_", 1)[0] for k, r in sim.items() if "err" in r}
    for n in public:
        stem = n[:-len("_kernel")].replace("leaky_relu_", "leaky_")
        assert any(c.startswith(stem) for c in covered), f"no simulator case for {n}"


# --------------------------------------------------------------------------------- real GPU
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_cupy_path_matches_cpu_kernels_on_a_side_stream(dtype):
    """Every GPU function on CuPy arrays (KernelLauncher's addresses, CuPy's current stream),
    against the CPU kernel; Conv2d's chunk views (y[s:e], dy[s:e], dx[s:e]) included."""
    from test_cuda_kernels import _gpu
    cp = _gpu()
    import numpy as np
    from bll_ref.gpu import layer_kernels as G
    from bll_ref.layers import kernels as K
    rng = np.random.default_rng(4)
    dt = np.dtype(dtype).type
    N, C, H, W = 6, 16, 15, 15
    P = H * W

    def r(*shape):
        return (rng.standard_normal(shape) * 30).astype(dt)

    x4, x3, dy3 = r(N, C, H, W), r(N, C, P) + dt(100), r(N, C, P)
    mean64 = x3.astype(np.float64).mean(axis=(0, 2))
    inv_std, gamma, beta = (1 / (x3.std(axis=(0, 2)) + 1)).astype(dt), r(C), r(C)
    xhat3 = ((x3 - mean64[None, :, None].astype(dt)) * inv_std[None, :, None]).astype(dt)
    y2 = r(C, 2 * P)
    mask = rng.random(N * C * P) > 0.5
    arg = rng.integers(0, 4, (N, C, 7, 7)).astype(np.int8)
    cases = [  # (name, args, output positions, slice of the outputs the kernel writes)
        ("im2col_kernel", [x4, 3, 3, 1, 1, 1, 1, H, W, np.empty((C * 9, N * P), dt)], (9,)),
        ("col2im_kernel", [r(C * 9, 2 * P), 3, 3, 1, 1, 1, 1, H, W, np.empty((N, C, H, W), dt)], (9,)),
        ("conv_out_kernel", [y2, r(C), np.empty((N, C, P), dt)], (2,)),
        ("conv_dy_kernel", [dy3, np.empty((C, N * P), dt), np.empty(C)], (1, 2)),
        ("leaky_relu_forward_kernel", [x3.reshape(-1), dt(0.1), np.empty(x3.size, dt), np.empty(x3.size, bool)], (2, 3)),
        ("leaky_relu_backward_kernel", [dy3.reshape(-1), mask, dt(0.1), np.empty(dy3.size, dt)], (3,)),
        ("layer_norm_forward_kernel", [x3.reshape(-1, P), 1e-5, np.empty((N * C, P), dt), np.empty(N * C, dt)], (2, 3)),
        ("layer_norm_backward_kernel", [dy3.reshape(-1, P), xhat3.reshape(-1, P), inv_std.repeat(N), np.empty((N * C, P), dt)], (3,)),
        ("batch_norm_stats_kernel", [x3, np.empty(C), np.empty(C)], (1, 2)),
        ("batch_norm_apply_kernel", [x3, mean64, inv_std, gamma, beta, np.empty_like(x3), np.empty_like(x3)], (5, 6)),
        ("batch_norm_backward_kernel", [dy3, xhat3, gamma, inv_std, True, np.empty_like(x3), np.empty(C), np.empty(C)], (5, 6, 7)),
        ("max_pool_forward_kernel", [x4, 3, 3, 2, 2, np.empty((N, C, 7, 7), dt), np.empty((N, C, 7, 7), np.int8)], (5, 6)),
        ("max_pool_backward_kernel", [r(N, C, 7, 7), arg, 3, 2, 2, np.empty((N, C, H, W), dt)], (5,)),
    ]
    tol = 1e-12 if dt is np.float64 else 1e-5
    with cp.cuda.Stream(non_blocking=True) as stream:
        for name, args, outs in cases:
            ref = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
            getattr(K, name)(*ref)
            dev = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
            for i in outs:
                dev[i][...] = np.nan if dev[i].dtype.kind == "f" else 1   # poison
            getattr(G, name)(*dev)
            for i in outs:
                got = cp.asnumpy(dev[i])
                if got.dtype.kind != "f":
                    assert np.array_equal(got, ref[i]), name
                else:
                    err = np.max(np.abs(got.astype(np.float64) - ref[i])) / np.max(np.abs(ref[i]))
                    assert err <= tol, (name, i, err)
        # Conv2d's chunks: leading-axis views of contiguous arrays, written in place
        out = cp.full((N, C, P), np.nan, dt)
        bias = r(C)
        G.conv_out_kernel(cp.asarray(y2), cp.asarray(bias), out[2:4])
        ref = np.full((N, C, P), np.nan, dt)
        K.conv_out_kernel(y2, bias, ref[2:4])
        assert np.array_equal(cp.asnumpy(out), ref, equal_nan=True)
        d_dy2, ref_dy2 = cp.empty((C, 2 * P), dt), np.empty((C, 2 * P), dt)
        G.conv_dy_kernel(cp.asarray(dy3)[2:4], d_dy2, cp.empty(0, dt))
        K.conv_dy_kernel(dy3[2:4], ref_dy2, np.empty(0, dt))
        assert np.array_equal(cp.asnumpy(d_dy2), ref_dy2)
        with pytest.raises(ValueError, match="x must be a C-contiguous"):
            G.leaky_relu_forward_kernel(cp.asarray(x3).reshape(-1)[::2], dt(0.1), cp.empty(x3.size // 2, dt),
                                        cp.empty(x3.size // 2, bool))
        stream.synchronize()
