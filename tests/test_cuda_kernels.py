"""numba.cuda kernels (bll_ref.losses.cuda) in the CUDA simulator, against the NumPy reference.

Both call paths: host arrays in -> host arrays out, and device arrays in -> device arrays out
(no host array among the results). The simulator has to be switched on before numba.cuda is
first imported, so every check runs in ONE subprocess with NUMBA_ENABLE_CUDASIM=1 (a timeout
guards it) that prints a JSON report; the tests below assert on its parts.

The simulator's device arrays are numba's own; it cannot map another library's
``__cuda_array_interface__`` buffer. The routing of such objects (CuPy, PyTorch) through
``numba.cuda.as_cuda_array`` is checked with a stand-in object whose interface the test resolves
to a simulator array; on real hardware numba does that step itself.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SIM_CODE = r'''
import json, numpy as np
from numba import cuda as nbcuda
from bll_ref.losses import cuda, local

out = {"available": cuda.available()}
rng = np.random.default_rng(0)
SHAPE = (2, 3, 5, 7)        # (N, C, H, W): 210 elements, 2 blocks of 128 threads


def inputs(dt):
    a = np.clip(rng.standard_normal(SHAPE) * 30, -1e3, 1e3).astype(dt)
    b = np.clip(rng.standard_normal(SHAPE) * 30, -1e3, 1e3).astype(dt)
    a[0, 0, 0, :3] = [1e3, -1e3, 0.0]; b[0, 0, 0, :3] = [-1e3, 1e3, 1e3]   # saturation
    return a, b


def errs(k, r):
    """relative loss error, then max |diff| / max |ref| per gradient"""
    return [abs(float(k[0]) - r[0]) / abs(r[0])] + [
        float(np.max(np.abs(x.astype(np.float64) - y)) / np.max(np.abs(y))) for x, y in zip(k[1:], r[1:])]


def describe(res):
    return [{"type": type(v).__name__, "device": cuda.is_device_array(v), "ndarray": isinstance(v, np.ndarray),
             "shape": list(getattr(v, "shape", ())), "dtype": str(getattr(v, "dtype", type(v).__name__))}
            for v in res]


def host(res):
    return [float(res[0].copy_to_host()[0])] + [v.copy_to_host() for v in res[1:]]


calls = {"eq8": (lambda x, y: cuda.bernoulli_eq8(x, y, 0.4), lambda x, y: local.bernoulli_eq8(x, y, 0.4)),
         "gauss": (lambda x, y: cuda.kl_ef_gradients("gaussian", x, y),
                   lambda x, y: local.kl_ef_gradients("gaussian", x, y))}
for dt in (np.float64, np.float32):
    a, b = inputs(dt)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for name, (gpu, ref) in calls.items():
        r = ref(a64, b64)
        kh = gpu(a, b)
        da, db = nbcuda.to_device(a), nbcuda.to_device(b)
        kd = gpu(da, db)
        key = f"{name}_{dt.__name__}"
        out["host_" + key] = {"err": errs(kh, r), "types": describe(kh)}
        kdh = host(kd)
        out["dev_" + key] = {"err": errs(kdh, r), "types": describe(kd),
                             "same_as_host": kdh[0] == kh[0] and all(np.array_equal(x, y) for x, y in zip(kdh[1:], kh[1:])),
                             "inputs_untouched": np.array_equal(da.copy_to_host(), a) and np.array_equal(db.copy_to_host(), b)}

# ef_gradients: device in -> two device arrays out
g = cuda.ef_gradients("gaussian", nbcuda.to_device(a), nbcuda.to_device(b))
out["ef_dev_types"] = describe(g)


# an object that only has __cuda_array_interface__ (as CuPy's arrays do): the simulator cannot map
# a device pointer, so the stand-in resolves it to the simulator array it wraps
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
fa, fb = Foreign(nbcuda.to_device(a64)), Foreign(nbcuda.to_device(b64))
kf = cuda.bernoulli_eq8(fa, fb, 0.4)
out["foreign"] = {"routed": seen, "types": describe(kf), "err": errs(host(kf), local.bernoulli_eq8(a64, b64, 0.4))}


def error(f):
    try:
        f()
    except ValueError as e:
        return "ValueError: " + str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


d64, d32 = nbcuda.to_device(a64), nbcuda.to_device(a64.astype(np.float32))
out["errors"] = {
    "mixed_host_device": error(lambda: cuda.bernoulli_eq8(d64, b64, 0.4)),
    "mixed_device_host": error(lambda: cuda.kl_ef_gradients("gaussian", a64, d64)),
    "dtype_mismatch": error(lambda: cuda.bernoulli_eq8(d64, d32, 0.4)),
    "shape_mismatch": error(lambda: cuda.bernoulli_eq8(d64, nbcuda.to_device(a64[:1]), 0.4)),
    "int_dtype": error(lambda: cuda.bernoulli_eq8(nbcuda.to_device(np.zeros((2, 3), np.int32)),
                                                  nbcuda.to_device(np.zeros((2, 3), np.int32)), 0.4)),
    "non_contiguous": error(lambda: cuda.bernoulli_eq8(nbcuda.to_device(a64)[:, :, :, ::2],
                                                       nbcuda.to_device(a64)[:, :, :, ::2], 0.4)),
    "scalar": error(lambda: cuda.bernoulli_eq8(nbcuda.to_device(np.zeros(())), nbcuda.to_device(np.zeros(())), 0.4)),
    "bad_m_device": error(lambda: cuda.bernoulli_eq8(d64, d64, 1.5)),
    "bernoulli_family": error(lambda: cuda.ef_gradients("bernoulli", d64, d64)),
    "host_shape_mismatch": error(lambda: cuda.bernoulli_eq8(a64, a64[:1], 0.4)),
    "host_nan": error(lambda: cuda.bernoulli_eq8(np.full((2, 3), np.nan), np.zeros((2, 3)), 0.4)),
}
nan_loss = cuda.bernoulli_eq8(nbcuda.to_device(np.full((2, 3), np.nan)), nbcuda.to_device(np.zeros((2, 3))), 0.4)[0]
out["device_nan_loss"] = repr(float(nan_loss.copy_to_host()[0]))

# the on-device sum of block partials: many partials (more than THREADS), fixed order
partial = rng.standard_normal(3 * cuda.THREADS + 17)
d_loss = nbcuda.device_array(1, np.float64)
cuda._sum_partials_kernel[1, cuda.THREADS](nbcuda.to_device(partial), 1.0 / 7, d_loss)
out["sum_partials_err"] = abs(float(d_loss.copy_to_host()[0]) - float(partial.sum() / 7)) / abs(partial.sum() / 7)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def sim():
    env = dict(os.environ, PYTHONPATH=ROOT, NUMBA_ENABLE_CUDASIM="1")
    probe = subprocess.run([sys.executable, "-c", "from numba import cuda; assert cuda.is_available()"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"numba.cuda simulator cannot start here: {probe.stderr.strip().splitlines()[-1:]}")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_SIM_CODE)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


KEYS = [f"{k}_{d}" for k in ("eq8", "gauss") for d in ("float64", "float32")]


@pytest.mark.parametrize("key", KEYS)
def test_host_arrays_in_host_arrays_out_match_numpy_reference(sim, key):
    r = sim["host_" + key]
    dtype = key.split("_")[1]
    assert r["types"][0]["type"] == "float"
    for t in r["types"][1:]:
        assert t["ndarray"] and not t["device"] and t["shape"] == [2, 3, 5, 7] and t["dtype"] == dtype, t
    # float64 on the device; float32 outputs are the float64 values rounded once
    assert max(r["err"]) < (1e-12 if dtype == "float64" else 1e-6), r["err"]


@pytest.mark.parametrize("key", KEYS)
def test_device_arrays_in_device_arrays_out_no_host_copy(sim, key):
    r = sim["dev_" + key]
    dtype = key.split("_")[1]
    loss, *grads = r["types"]
    assert loss["device"] and not loss["ndarray"] and loss["shape"] == [1] and loss["dtype"] == "float64", loss
    for t in grads:
        assert t["device"] and not t["ndarray"] and t["shape"] == [2, 3, 5, 7] and t["dtype"] == dtype, t
    assert max(r["err"]) < (1e-12 if dtype == "float64" else 1e-6), r["err"]
    assert r["same_as_host"], "device path must give the host path's values bit for bit"
    assert r["inputs_untouched"]


def test_ef_gradients_device_path_returns_two_device_arrays(sim):
    assert len(sim["ef_dev_types"]) == 2
    assert all(t["device"] and not t["ndarray"] for t in sim["ef_dev_types"])


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
    ("bernoulli_family", ["Gaussian family only"]),
    ("host_shape_mismatch", ["same shape"]),
    ("host_nan", ["NaN"]),
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


def test_numpy_arrays_are_not_device_arrays():
    from bll_ref.losses import cuda
    assert not cuda.is_device_array(np.zeros(3))
    assert not cuda.is_device_array([1.0, 2.0])


def _bench(*args, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda_kernels.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env))


def test_cuda_benchmark_without_a_gpu_prints_one_line_and_exits_0():
    from bll_ref.losses import cuda
    if cuda.available() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("a CUDA GPU is present: the benchmark would run")
    res = _bench(NUMBA_ENABLE_CUDASIM="0")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "GPU" in lines[0], res.stdout
    res = _bench(NUMBA_ENABLE_CUDASIM="1")      # the simulator is not a GPU to benchmark
    assert res.returncode == 0 and "simulator is not a GPU" in res.stdout, (res.stdout, res.stderr)


def test_cuda_benchmark_code_path_in_the_simulator(sim):
    # the benchmark's whole code path on one tiny shape (writes nothing); the fixture skips
    # when the simulator cannot start
    res = _bench("--simulator-smoke")
    assert res.returncode == 0, res.stderr
    assert "simulator smoke run: 2 cases, results not written" in res.stdout, res.stdout
    rows = [r for r in res.stdout.splitlines() if r.startswith("| bernoulli_eq8") or r.startswith("| gaussian_kl_ef")]
    for r in rows:
        assert float(r.strip("| ").split("|")[-1]) < 1e-6, r    # GPU result agrees with the CPU kernel
