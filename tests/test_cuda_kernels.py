"""numba.cuda loss kernels (bll_ref.losses.cuda, whose kernels live in bll_ref.gpu.loss_kernels)
against their NumPy twins (losses.local, output).

Three layers of checks:

- **PTX**: every kernel of ``gpu.loss_kernels`` compiles for real hardware (sm_90 and sm_75, each
  signature it is launched with). The simulator accepts code NVVM rejects (the builtin
  ``max(x, 0.0)`` did), so this runs in a process WITHOUT the simulator; NVIDIA's pip NVVM
  needs no GPU. It fails, not skips, when numba-cuda is missing.
- **simulator**: semantics of every kernel on a CPU. The simulator has to be switched on before
  numba.cuda is first imported, so all of it runs in ONE subprocess with NUMBA_ENABLE_CUDASIM=1
  that prints a JSON report; the tests assert on its parts. Its device arrays are numba's (the
  CuPy path needs a GPU); objects with only ``__cuda_array_interface__`` are checked with a
  stand-in that the test resolves to a simulator array.
- **GPU** (skipped without one): the CuPy path for real, on a non-default stream, against the
  NumPy twins, through each launch path of ``KernelLauncher``; the numba and host paths too.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository and its tests (fakecupy) first, and whatever PYTHONPATH already holds (e.g. a carried numpy) after it
PYTHONPATH = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]
                            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


#: Prepended to every simulator script: the simulator's cuda.shared.array made thread-safe
#: (``fakecupy.lock_shared_arrays`` says why), and what a call raises, as text (None if it raises
#: nothing).
SIM_ERROR_HELPER = '''
from fakecupy import lock_shared_arrays as _lock_shared_arrays
_lock_shared_arrays()


def error(f):
    try:
        f()
    except ValueError as e:
        return "ValueError: " + str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None
'''


def _python(code, timeout=600, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=dict(os.environ, PYTHONPATH=PYTHONPATH, **env))


# ----------------------------------------------------------------------------------------- PTX
PTX_CODE = r'''
import json, sys, importlib
from numba import cuda
from numba.cuda.dispatcher import CUDADispatcher
mod = importlib.import_module(sys.argv[1])
kernels = sorted(n for n, v in vars(mod).items() if isinstance(v, CUDADispatcher) and not v.targetoptions.get("device"))
helpers = {n: v.targetoptions.get("inline") for n, v in vars(mod).items()
           if isinstance(v, CUDADispatcher) and v.targetoptions.get("device")}
compiled, failed = [], {}
for name, sigs in mod.PTX_SIGNATURES.items():
    for key, sig in sigs.items():
        for cc in ((9, 0), (7, 5)):
            try:
                ptx, _ = cuda.compile_ptx(getattr(mod, name).py_func, sig, cc=cc)
                assert ".entry" in ptx
                compiled.append(f"{name}/{key}/sm_{cc[0]}{cc[1]}")
            except Exception as e:
                failed[f"{name}/{key}/sm_{cc[0]}{cc[1]}"] = f"{type(e).__name__}: {str(e)[:300]}"
# modules that launch these kernels: the kernels they define themselves (which the list could miss)
others = {}
for name in sys.argv[2:]:
    other = importlib.import_module(name)
    others[name] = {"kernels": sorted(n for n, v in vars(other).items() if isinstance(v, CUDADispatcher)),
                    "same_signatures": getattr(other, "PTX_SIGNATURES", None) is mod.PTX_SIGNATURES}
print(json.dumps({"kernels": kernels, "listed": sorted(mod.PTX_SIGNATURES), "helpers": helpers,
                  "compiled": compiled, "failed": failed, "others": others}))
'''


def ptx_report(module, *others):
    """Compile every kernel of ``module`` to PTX in a process without the simulator; list the
    kernels that each of ``others`` defines itself."""
    assert importlib.util.find_spec("numba_cuda") is not None, \
        "numba-cuda is not installed: the GPU kernels cannot be checked (pip install 'bll_ref[cuda]')"
    res = subprocess.run([sys.executable, "-c", PTX_CODE, module, *others], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env=dict(os.environ, PYTHONPATH=PYTHONPATH, NUMBA_ENABLE_CUDASIM="0"))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_ptx(report):
    assert report["kernels"], "no kernels found"
    assert report["kernels"] == report["listed"], "every kernel must be listed in PTX_SIGNATURES"
    assert not report["failed"], report["failed"]
    # a device function that is not inlined makes compile_ptx initialise the driver (fails without a GPU)
    assert all(v == "always" for v in report["helpers"].values()), report["helpers"]
    assert len(report["compiled"]) >= 2 * len(report["kernels"])


def test_every_loss_kernel_compiles_to_ptx_for_sm90_and_sm75():
    report = ptx_report("bll_ref.gpu.loss_kernels", "bll_ref.losses.cuda")
    check_ptx(report)
    # losses.cuda launches gpu.loss_kernels' kernels (its PTX_SIGNATURES is theirs) and defines none
    assert report["others"] == {"bll_ref.losses.cuda": {"kernels": [], "same_signatures": True}}, report["others"]
    assert {"_bernoulli_eq8_kernel", "_softmax_ce_kernel", "_sum_partials_kernel"} <= set(report["kernels"])
    assert "_block_reduce" in report["helpers"]


# ----------------------------------------------------------------------------------- simulator
_SIM_CODE = r'''
import json, numpy as np
from numba import cuda as nbcuda
from bll_ref.gpu import loss_kernels
from bll_ref.losses import cuda, local, output, kernels

out = {"available": cuda.available()}
rng = np.random.default_rng(0)
SHAPE = (2, 3, 5, 7)        # (N, C, H, W): 210 elements, not a multiple of the 256-thread block


def inputs(dt, shape=SHAPE, scale=30):
    a = np.clip(rng.standard_normal(shape) * scale, -1e3, 1e3).astype(dt)
    b = np.clip(rng.standard_normal(shape) * scale, -1e3, 1e3).astype(dt)
    a.reshape(-1)[:4] = [1e3, -1e3, 0.0, 1e3]; b.reshape(-1)[:4] = [-1e3, 1e3, 1e3, 1e3]   # saturation
    return a, b


def errs(k, r, floor=1e-300):
    """relative loss error, then max |diff| / max |ref| per array (denominators at least floor)"""
    return [abs(float(k[0]) - r[0]) / max(abs(r[0]), floor)] + [
        float(np.max(np.abs(x.astype(np.float64) - y)) / max(np.max(np.abs(y)), floor)) for x, y in zip(k[1:], r[1:])]


def describe(res):
    return [{"type": type(v).__name__, "device": cuda.is_device_array(v), "ndarray": isinstance(v, np.ndarray),
             "shape": list(getattr(v, "shape", ())), "dtype": str(getattr(v, "dtype", type(v).__name__))}
            for v in res]


def host(res):
    return [float(res[0].copy_to_host()[0])] + [v.copy_to_host() for v in res[1:]]


def no_subnormals(arrays):
    return all(bool(np.all((x == 0) | (np.abs(x) >= np.finfo(x.dtype).tiny))) for x in arrays)


ESTIMATORS = {
    "eq8": (lambda k, x, y: k.bernoulli_eq8(x, y, 0.4), True),
    "s12": (lambda k, x, y: k.gaussian_s12(x, y, 0.4, 2.0), False),
    "s13": (lambda k, x, y: k.poisson_s13(x, y, 0.4), True),
    "kl_bernoulli": (lambda k, x, y: k.kl_ef_gradients("bernoulli", x, y), True),
    "kl_gaussian": (lambda k, x, y: k.kl_ef_gradients("gaussian", x, y), False),
    "kl_poisson": (lambda k, x, y: k.kl_ef_gradients("poisson", x, y), True),
}
for dt in (np.float64, np.float32):
    a, b = inputs(dt)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for name, (call, flushes) in ESTIMATORS.items():
        r = call(local, a64, b64)
        kh = call(cuda, a, b)
        da, db = nbcuda.to_device(a), nbcuda.to_device(b)
        kd = call(cuda, da, db)
        # determinism (a property of the shared reduction): checked on two kernels, to save simulator time
        kd2 = call(cuda, da, db) if name in ("eq8", "kl_gaussian") else kd
        key = f"{name}_{dt.__name__}"
        kdh, kd2h = host(kd), host(kd2)
        out["host_" + key] = {"err": errs(kh, r), "types": describe(kh),
                              "vs_cpu_kernel": errs(kh, call(kernels, a, b))}
        out["dev_" + key] = {
            "err": errs(kdh, r), "types": describe(kd),
            "same_as_host": kdh[0] == kh[0] and all(np.array_equal(x, y) for x, y in zip(kdh[1:], kh[1:])),
            "deterministic": kdh[0] == kd2h[0] and all(np.array_equal(x, y) for x, y in zip(kdh[1:], kd2h[1:])),
            "no_subnormals": no_subnormals(kdh[1:]) if flushes else None,
            "inputs_untouched": np.array_equal(da.copy_to_host(), a) and np.array_equal(db.copy_to_host(), b)}

# every element saturated (|a|, |b| = 1e3): finite, and subnormal gradients flushed as on the CPU. The
# loss cancels to a small fraction of its terms, so the reference takes m rounded to the dtype, as
# the kernel does; gradients far below the dtype's smallest normal count as 0.
for dt in (np.float32, np.float64):
    a = (rng.choice([-1.0, 1.0], (3, 50)) * 1e3).astype(dt)
    b = (rng.choice([-1.0, 1.0], (3, 50)) * 1e3).astype(dt)
    k = host(cuda.bernoulli_eq8(nbcuda.to_device(a), nbcuda.to_device(b), 0.7))
    r = local.bernoulli_eq8(a.astype(np.float64), b.astype(np.float64), float(dt(0.7)))
    out[f"saturated_{dt.__name__}"] = {"finite": bool(np.isfinite(k[0]) and all(np.all(np.isfinite(x)) for x in k[1:])),
                                       "err": errs(k, r, float(np.finfo(dt).tiny)), "no_subnormals": no_subnormals(k[1:])}

# grid stride: 2 blocks of 256 threads over 750 elements (each thread takes 2 or 3), 2 partial sums
a, b = inputs(np.float64, (3, 250))
full = host(cuda.bernoulli_eq8(nbcuda.to_device(a), nbcuda.to_device(b), 0.4))
cuda.MAX_BLOCKS = 2
strided = host(cuda.bernoulli_eq8(nbcuda.to_device(a), nbcuda.to_device(b), 0.4))
cuda.MAX_BLOCKS = 1024
out["grid_stride"] = {"err": errs(strided, local.bernoulli_eq8(a, b, 0.4)),
                      "grads_equal_full_grid": all(np.array_equal(x, y) for x, y in zip(strided[1:], full[1:]))}

# softmax cross-entropy: odd N, logits up to 1e4, int32 / int64 labels, both dtypes
for dt in (np.float64, np.float32):
    for lt in (np.int32, np.int64):
        z = (rng.standard_normal((37, 10)) * 5).astype(dt)
        z[0, 3], z[1] = 1e4, -1e4
        y = rng.integers(0, 10, 37).astype(lt)
        r = output.softmax_cross_entropy(z.astype(np.float64), y)
        kd = cuda.softmax_cross_entropy(nbcuda.to_device(z), nbcuda.to_device(y))
        kd2 = cuda.softmax_cross_entropy(nbcuda.to_device(z), nbcuda.to_device(y)) if lt is np.int64 else kd
        kh = cuda.softmax_cross_entropy(z, y) if lt is np.int64 else kd
        out[f"ce_{dt.__name__}_{lt.__name__}"] = {
            "err_dev": errs(host(kd), r), "err_host": errs(kh if lt is np.int64 else host(kd), r),
            "types": describe(kd), "host_types": describe(kh) if lt is np.int64 else None,
            "deterministic": all(np.array_equal(np.asarray(x), np.asarray(w)) for x, w in zip(host(kd), host(kd2)))}
z = rng.standard_normal((300, 10)); y = rng.integers(0, 10, 300)
cuda.MAX_BLOCKS = 1                                    # one block of 256 threads walks 300 rows
out["ce_grid_stride"] = errs(host(cuda.softmax_cross_entropy(nbcuda.to_device(z), nbcuda.to_device(y))),
                             output.softmax_cross_entropy(z, y))
cuda.MAX_BLOCKS = 1024
bad = y[:5].copy(); bad[2] = 10
lb, gb = host(cuda.softmax_cross_entropy(nbcuda.to_device(z[:5]), nbcuda.to_device(bad)))
out["ce_bad_label_device"] = {"loss": repr(lb), "nan_row": bool(np.all(np.isnan(gb[2]))),
                              "other_rows_finite": bool(np.all(np.isfinite(np.delete(gb, 2, axis=0))))}

# ef_gradients / kl: device in -> device out
a, b = inputs(np.float64)
g = cuda.ef_gradients("poisson", nbcuda.to_device(a), nbcuda.to_device(b))
out["ef_dev_types"] = describe(g)
out["kl_host"] = abs(cuda.kl("bernoulli", a, b) - local.kl("bernoulli", a, b)) / abs(local.kl("bernoulli", a, b))


# an object that only has __cuda_array_interface__ (as PyTorch's CUDA tensors do): the simulator cannot
# map a device pointer, so the stand-in resolves it to the simulator array it wraps
class Foreign:
    def __init__(self, d):
        self._d = d
    @property
    def __cuda_array_interface__(self):
        return {"shape": tuple(self._d.shape), "typestr": self._d.dtype.str, "data": (0, False), "version": 3}


seen = []
def as_cuda_array(obj, sync=True):
    seen.append(type(obj).__name__)
    return obj._d
nbcuda.as_cuda_array = as_cuda_array
fa, fb = Foreign(nbcuda.to_device(a)), Foreign(nbcuda.to_device(b))
kf = cuda.bernoulli_eq8(fa, fb, 0.4)
out["foreign"] = {"routed": seen, "types": describe(kf), "err": errs(host(kf), local.bernoulli_eq8(a, b, 0.4))}


d64, d32 = nbcuda.to_device(a), nbcuda.to_device(a.astype(np.float32))
zd, yd = nbcuda.to_device(np.zeros((4, 3))), nbcuda.to_device(np.zeros(4, np.int64))
out["errors"] = {
    "mixed_host_device": error(lambda: cuda.bernoulli_eq8(d64, b, 0.4)),
    "mixed_device_host": error(lambda: cuda.kl_ef_gradients("gaussian", a, d64)),
    "dtype_mismatch": error(lambda: cuda.bernoulli_eq8(d64, d32, 0.4)),
    "shape_mismatch": error(lambda: cuda.bernoulli_eq8(d64, nbcuda.to_device(a[:1]), 0.4)),
    "int_dtype": error(lambda: cuda.bernoulli_eq8(nbcuda.to_device(np.zeros((2, 3), np.int32)),
                                                  nbcuda.to_device(np.zeros((2, 3), np.int32)), 0.4)),
    "non_contiguous": error(lambda: cuda.bernoulli_eq8(nbcuda.to_device(a)[:, :, :, ::2],
                                                       nbcuda.to_device(a)[:, :, :, ::2], 0.4)),
    "scalar": error(lambda: cuda.bernoulli_eq8(nbcuda.to_device(np.zeros(())), nbcuda.to_device(np.zeros(())), 0.4)),
    "bad_m_device": error(lambda: cuda.bernoulli_eq8(d64, d64, 1.5)),
    "unknown_family": error(lambda: cuda.ef_gradients("laplace", d64, d64)),
    "host_shape_mismatch": error(lambda: cuda.bernoulli_eq8(a, a[:1], 0.4)),
    "host_nan": error(lambda: cuda.bernoulli_eq8(np.full((2, 3), np.nan), np.zeros((2, 3)), 0.4)),
    "ce_float_labels": error(lambda: cuda.softmax_cross_entropy(zd, nbcuda.to_device(np.zeros(4)))),
    "ce_label_shape": error(lambda: cuda.softmax_cross_entropy(zd, nbcuda.to_device(np.zeros(3, np.int64)))),
    "ce_3d_logits": error(lambda: cuda.softmax_cross_entropy(nbcuda.to_device(np.zeros((4, 3, 2))), yd)),
    "ce_mixed": error(lambda: cuda.softmax_cross_entropy(zd, np.zeros(4, np.int64))),
    "ce_host_label_range": error(lambda: cuda.softmax_cross_entropy(np.zeros((4, 3)), np.array([0, 1, 2, 3]))),
}
nan_loss = cuda.bernoulli_eq8(nbcuda.to_device(np.full((2, 3), np.nan)), nbcuda.to_device(np.zeros((2, 3))), 0.4)[0]
out["device_nan_loss"] = repr(float(nan_loss.copy_to_host()[0]))

# the on-device sum of block partials: more partials than threads, fixed order
partial = rng.standard_normal(3 * cuda.THREADS + 17)
d_loss = nbcuda.device_array(1, np.float64)
loss_kernels._sum_partials_kernel[1, cuda.THREADS](nbcuda.to_device(partial), partial.size, 1.0 / 7, d_loss)
out["sum_partials_err"] = abs(float(d_loss.copy_to_host()[0]) - float(partial.sum() / 7)) / abs(partial.sum() / 7)

# one launch: the last block's sum is the separate partial-sum launch bit for bit, and the ticket
# counter is back at 0 after every launch (the cached workspace is reused by the next one)
a, b = inputs(np.float64, (3, 250))
da, db = nbcuda.to_device(a.reshape(-1)), nbcuda.to_device(b.reshape(-1))
o1, o2 = nbcuda.device_array(a.size), nbcuda.device_array(a.size)
d_partial, d_counter = nbcuda.device_array(3), nbcuda.to_device(np.zeros(1, np.int32))
one = []
for run in range(2):
    d_one, d_two = nbcuda.device_array(1), nbcuda.device_array(1)
    loss_kernels._bernoulli_eq8_kernel[3, cuda.THREADS](da, db, 0.4, 0.0, 1 / 3, float(np.finfo(np.float64).tiny), a.size,
                                                         o1, o2, d_partial, d_counter, d_one)
    counter_after = int(d_counter.copy_to_host()[0])
    loss_kernels._sum_partials_kernel[1, cuda.THREADS](d_partial, 3, 1 / 3, d_two)
    one.append({"one": d_one.copy_to_host()[0].tobytes().hex(), "two": d_two.copy_to_host()[0].tobytes().hex(),
                "counter_after": counter_after})
out["one_launch"] = {"runs": one, "err": abs(float(np.frombuffer(bytes.fromhex(one[0]["one"]))[0])
                                             - local.bernoulli_eq8(a, b, 0.4)[0]) / abs(local.bernoulli_eq8(a, b, 0.4)[0])}
print(json.dumps(out))
'''


def run_simulator(code):
    """Run a simulator script (``SIM_ERROR_HELPER`` prepended) -> the JSON of its last line; skip
    when the simulator cannot start here."""
    probe = _python("from numba import cuda; assert cuda.is_available()", timeout=120, NUMBA_ENABLE_CUDASIM="1")
    if probe.returncode != 0:
        pytest.skip(f"numba.cuda simulator cannot start here: {probe.stderr.strip().splitlines()[-1:]}")
    res = _python(SIM_ERROR_HELPER + code, NUMBA_ENABLE_CUDASIM="1")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sim():
    return run_simulator(_SIM_CODE)


NAMES = ("eq8", "s12", "s13", "kl_bernoulli", "kl_gaussian", "kl_poisson")
KEYS = [f"{k}_{d}" for k in NAMES for d in ("float64", "float32")]


def _tol(dtype):
    # float64 on the device; float32 outputs are the float64 values rounded once
    return 1e-12 if dtype == "float64" else 1e-6


@pytest.mark.parametrize("key", KEYS)
def test_host_arrays_in_host_arrays_out_match_numpy_reference(sim, key):
    r = sim["host_" + key]
    dtype = key.rsplit("_", 1)[1]
    assert r["types"][0]["type"] == "float"
    for t in r["types"][1:]:
        assert t["ndarray"] and not t["device"] and t["shape"] == [2, 3, 5, 7] and t["dtype"] == dtype, t
    assert max(r["err"]) < _tol(dtype), r["err"]
    assert max(r["vs_cpu_kernel"]) < _tol(dtype), r["vs_cpu_kernel"]   # and the Numba CPU kernel


@pytest.mark.parametrize("key", KEYS)
def test_device_arrays_in_device_arrays_out_deterministic(sim, key):
    r = sim["dev_" + key]
    dtype = key.rsplit("_", 1)[1]
    loss, *grads = r["types"]
    assert loss["device"] and not loss["ndarray"] and loss["shape"] == [1] and loss["dtype"] == "float64", loss
    for t in grads:
        assert t["device"] and not t["ndarray"] and t["shape"] == [2, 3, 5, 7] and t["dtype"] == dtype, t
    assert max(r["err"]) < _tol(dtype), r["err"]
    assert r["same_as_host"], "device path must give the host path's values bit for bit"
    assert r["deterministic"], "two runs must give the same bits"
    assert r["inputs_untouched"]
    assert r["no_subnormals"] in (True, None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fully_saturated_inputs_stay_finite_and_flush_subnormals(sim, dtype):
    r = sim[f"saturated_{dtype}"]
    assert r["finite"] and r["no_subnormals"]
    assert max(r["err"]) < _tol(dtype), r["err"]


def test_grid_stride_loop_and_several_partials(sim):
    r = sim["grid_stride"]
    assert max(r["err"]) < 1e-12, r["err"]
    assert r["grads_equal_full_grid"]   # elementwise results do not depend on the grid


@pytest.mark.parametrize("key", [f"ce_{d}_{l}" for d in ("float64", "float32") for l in ("int32", "int64")])
def test_softmax_cross_entropy_matches_output_module(sim, key):
    r = sim[key]
    dtype = key.split("_")[1]
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert max(r["err_dev"]) < tol and max(r["err_host"]) < tol, (r["err_dev"], r["err_host"])
    loss, dz = r["types"]
    assert loss["device"] and loss["shape"] == [1] and loss["dtype"] == "float64"
    assert dz["device"] and dz["shape"] == [37, 10] and dz["dtype"] == dtype
    if key.endswith("int64"):       # the host path and the determinism check run for int64 labels
        assert r["host_types"][0]["type"] == "float" and r["host_types"][1]["ndarray"]
    assert r["deterministic"]


def test_softmax_cross_entropy_grid_stride_and_bad_label(sim):
    assert max(sim["ce_grid_stride"]) < 1e-12
    bad = sim["ce_bad_label_device"]
    assert bad["loss"] == "nan" and bad["nan_row"] and bad["other_rows_finite"]


def test_ef_gradients_and_kl(sim):
    assert len(sim["ef_dev_types"]) == 2 and all(t["device"] and not t["ndarray"] for t in sim["ef_dev_types"])
    assert sim["kl_host"] < 1e-12


def test_cuda_array_interface_objects_go_through_as_cuda_array(sim):
    f = sim["foreign"]
    assert f["routed"] == ["Foreign", "Foreign"]
    assert all(t["device"] and not t["ndarray"] for t in f["types"])
    assert max(f["err"]) < 1e-12


@pytest.mark.parametrize("case, words", [
    ("mixed_host_device", ["a is a device array", "b is not"]),
    ("mixed_device_host", ["gamma is a device array", "phi is not"]),
    ("dtype_mismatch", ["same dtype", "float64", "float32"]),
    ("shape_mismatch", ["same shape", "(2, 3, 5, 7)", "(1, 3, 5, 7)"]),
    ("int_dtype", ["float32 or float64", "int32"]),
    ("non_contiguous", ["C-contiguous"]),
    ("scalar", ["(N, ...)"]),
    ("bad_m_device", ["mixing parameter"]),
    ("unknown_family", ["laplace"]),
    ("host_shape_mismatch", ["same shape"]),
    ("host_nan", ["NaN"]),
    ("ce_float_labels", ["int32 or int64", "float64"]),
    ("ce_label_shape", ["(4, 3)", "(3,)"]),
    ("ce_3d_logits", ["(N, C)"]),
    ("ce_mixed", ["same path"]),
    ("ce_host_label_range", ["[0, 3)"]),
])
def test_bad_inputs_raise_a_clear_value_error(sim, case, words):
    msg = sim["errors"][case]
    assert msg is not None and msg.startswith("ValueError: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_device_path_reports_nan_through_the_loss(sim):
    assert sim["device_nan_loss"] == "nan"


def test_on_device_sum_of_many_block_partials(sim):
    assert sim["sum_partials_err"] < 1e-14


def test_one_launch_loss_equals_the_two_launch_sum_bit_for_bit_and_resets_the_counter(sim):
    r = sim["one_launch"]
    assert r["err"] < 1e-12
    for run in r["runs"]:
        assert run["one"] == run["two"], run       # the last block adds the partials in the fixed order
        assert run["counter_after"] == 0, run      # so the next launch finds its last block again
    assert r["runs"][0]["one"] == r["runs"][1]["one"]


def test_numpy_arrays_are_not_device_arrays():
    from bll_ref.losses import cuda
    assert not cuda.is_device_array(np.zeros(3))
    assert not cuda.is_device_array([1.0, 2.0])


# ----------------------------------------------------------------------------------- benchmark
def test_cuda_benchmark_without_a_gpu_prints_one_line_and_exits_2():
    from bll_ref import backend
    if backend._gpu_status()[0]:
        pytest.skip("a CUDA GPU is present: the benchmark would run")
    for sim_flag in ("0", "1"):     # the simulator is not a GPU either
        res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda_kernels.py")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env=dict(os.environ, PYTHONPATH=PYTHONPATH, NUMBA_ENABLE_CUDASIM=sim_flag))
        assert res.returncode == 2, (res.stdout, res.stderr)
        lines = res.stdout.strip().splitlines()
        assert len(lines) == 1 and "skipped" in lines[0] and not res.stderr.strip(), (res.stdout, res.stderr)


# --------------------------------------------------------------------------------- real GPU
def _gpu():
    """cupy when a real GPU works in this process, else skip."""
    from bll_ref import backend
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not backend._gpu_status()[0]:
        pytest.skip("needs a CUDA GPU")
    return backend.require_cuda()


@pytest.mark.filterwarnings("error::RuntimeWarning")     # a launch path that falls back to another fails
@pytest.mark.parametrize("path", ["cupy", "core", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_cupy_path_matches_numpy_on_a_side_stream(dtype, path):
    cp = _gpu()
    from bll_ref.losses import cuda, local, output
    rng = np.random.default_rng(3)
    shape = (300, 1037)     # 311100 elements: more than THREADS * MAX_BLOCKS, so threads stride
    a = np.clip(rng.standard_normal(shape) * 30, -1e3, 1e3).astype(dtype)
    b = np.clip(rng.standard_normal(shape) * 30, -1e3, 1e3).astype(dtype)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    calls = {
        "eq8": lambda k, x, y: k.bernoulli_eq8(x, y, 0.4),
        "s12": lambda k, x, y: k.gaussian_s12(x, y, 0.4, 2.0),
        "s13": lambda k, x, y: k.poisson_s13(x, y, 0.4),
        "kl_bernoulli": lambda k, x, y: k.kl_ef_gradients("bernoulli", x, y),
        "kl_gaussian": lambda k, x, y: k.kl_ef_gradients("gaussian", x, y),
        "kl_poisson": lambda k, x, y: k.kl_ef_gradients("poisson", x, y),
    }
    tol = 1e-12 if dtype == np.float64 else 1e-6
    old = cuda.KernelLauncher.path
    cuda.KernelLauncher.path = path
    try:
        with cp.cuda.Stream(non_blocking=True) as stream:
            ca, cb = cp.asarray(a), cp.asarray(b)
            for name, call in calls.items():
                got = call(cuda, ca, cb)
                again = call(cuda, ca, cb)
                assert isinstance(got[0], cp.ndarray) and got[0].shape == () and got[0].dtype == np.float64
                assert all(isinstance(g, cp.ndarray) and g.shape == shape and g.dtype == dtype for g in got[1:])
                ref = call(local, a64, b64)
                assert abs(float(got[0]) - ref[0]) <= tol * abs(ref[0]), name
                for g, r in zip(got[1:], ref[1:]):
                    assert float(np.max(np.abs(cp.asnumpy(g).astype(np.float64) - r))) <= tol * np.max(np.abs(r)), name
                assert float(got[0]) == float(again[0]) and all(bool((x == y).all()) for x, y in zip(got[1:], again[1:]))
            z = cp.asarray((rng.standard_normal((1000, 10)) * 5).astype(dtype))
            y = cp.asarray(rng.integers(0, 10, 1000))
            loss, dz = cuda.softmax_cross_entropy(z, y)
            rl, rdz = output.softmax_cross_entropy(cp.asnumpy(z).astype(np.float64), cp.asnumpy(y))
            assert loss.shape == () and dz.dtype == dtype
            assert abs(float(loss) - rl) <= tol * abs(rl)
            assert float(np.max(np.abs(cp.asnumpy(dz) - rdz))) <= tol * np.max(np.abs(rdz))
            stream.synchronize()
        # numba device arrays on a GPU: addresses through cuda.core on the default stream, host copies
        from numba import cuda as nbcuda
        got = cuda.bernoulli_eq8(nbcuda.to_device(a), nbcuda.to_device(b), 0.4)
        ref = local.bernoulli_eq8(a64, b64, 0.4)
        assert got[0].shape == (1,) and abs(float(got[0].copy_to_host()[0]) - ref[0]) <= tol * abs(ref[0])
        host = cuda.bernoulli_eq8(a, b, 0.4)
        assert isinstance(host[0], float) and np.array_equal(host[1], got[1].copy_to_host())
    finally:
        cuda.KernelLauncher.path = old


_SHARED_RACE_CODE = r'''
import json, time
import numpy as np
from numba import cuda
from numba.cuda.simulator import kernelapi


class SlowNumpy:        # widen the window between the allocation's lookup and its store
    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, *a, **k):
        time.sleep(0.002)
        return np.empty(*a, **k)


kernelapi.np = SlowNumpy()


@cuda.jit
def block_sum(x, out):
    buf = cuda.shared.array(32, np.float64)
    t = cuda.threadIdx.x
    buf[t] = x[t]
    cuda.syncthreads()
    s = 16
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    if t == 0:
        out[cuda.blockIdx.x] = buf[0]


x = np.arange(32, dtype=np.float64)
wrong = 0
for _ in range(10):
    out = np.zeros(4)
    block_sum[4, 32](x, out)
    wrong += int(np.any(out != x.sum()))
print(json.dumps({"wrong": wrong}))
'''


def test_the_simulator_prelude_gives_a_block_one_shared_array():
    """SIM_ERROR_HELPER's lock: with the window between the simulator's allocation lookup and its
    store widened to 2 ms, an unlocked cuda.shared.array gave 26 of 30 block sums wrong here."""
    assert run_simulator(_SHARED_RACE_CODE)["wrong"] == 0
