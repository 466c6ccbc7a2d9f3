"""numba.cuda optimiser kernels (bll_ref.gpu.optim_kernels) against optim's NumPy twins.

As tests/test_cuda_kernels.py: every kernel compiles to PTX for sm_90 and sm_75 (a process
without the simulator; fails when numba-cuda is missing), the semantics run in ONE simulator
subprocess that prints a JSON report, and the CuPy path runs for real where a GPU is present.
"""
import math

import numpy as np
import pytest

from test_cuda_kernels import _gpu, check_ptx, ptx_report, run_simulator


def test_every_optimiser_kernel_compiles_to_ptx_for_sm90_and_sm75():
    report = ptx_report("bll_ref.gpu.optim_kernels")
    check_ptx(report)
    assert report["kernels"] == ["_adam_kernel", "_sgd_kernel", "_sgd_plain_kernel"]


_SIM_CODE = r'''
import json, math, numpy as np
from numba import cuda as nbcuda
from bll_ref.gpu import optim_kernels as ok
from bll_ref.optim import adam_update_reference, sgd_update_reference

rng = np.random.default_rng(0)
out = {}
LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def rel(x, r):
    return float(np.max(np.abs(x.astype(np.float64) - r)) / max(np.max(np.abs(r)), 1e-300))


def state(n, dt, scale=1.0):
    p, g, m, vel = (rng.standard_normal(n) * scale).astype(dt), (rng.standard_normal(n) * scale).astype(dt), \
        rng.standard_normal(n).astype(dt), rng.standard_normal(n).astype(dt)
    v = np.abs(rng.standard_normal(n)).astype(dt)
    return p, g, m, v, vel


def adam_gpu(p, g, m, v, t, wd):
    d = [nbcuda.to_device(x) for x in (p, g, m, v)]
    c1, c2 = 1 - B1 ** t, 1 - B2 ** t
    ok.adam(*d, LR / c1, B1, 1 - B1, B2, 1 - B2, 1 / math.sqrt(c2), EPS, wd)
    return [x.copy_to_host() for x in (d[0], d[2], d[3])], [np.array_equal(d[1].copy_to_host(), g)]


# 301 elements (not a multiple of 256), three steps t = 1..3 of state carried over, both dtypes,
# with and without weight decay; then saturating values (|p|, |g| ~ 1e3)
for dt in (np.float64, np.float32):
    for wd in (0.0, 0.05):
        for scale in (1.0, 1e3):
            p, g, m, v, vel = state(301, dt, scale)
            rp, rm, rv = (x.astype(np.float64) for x in (p, m, v))
            errs, untouched = [], []
            for t in (1, 2, 3):
                (p, m, v), same_g = adam_gpu(p, g, m, v, t, wd)
                adam_update_reference(rp, g.astype(np.float64), rm, rv, LR, B1, B2, EPS, wd, t)
                errs.append(max(rel(p, rp), rel(m, rm), rel(v, rv)))
                untouched += same_g
            out[f"adam_{dt.__name__}_{wd}_{scale}"] = {"err": errs, "dtype": str(p.dtype), "g_untouched": all(untouched),
                                                       "finite": bool(np.all(np.isfinite(p)))}
            for mom in (0.0, 0.9):
                q, velq = p.copy(), vel.copy()
                rq, rvel = q.astype(np.float64), velq.astype(np.float64)
                d = [nbcuda.to_device(x) for x in (q, g, velq)]
                if mom:
                    ok.sgd(*d, 0.1, mom, wd)
                else:
                    ok.sgd_plain(d[0], d[1], 0.1, wd)
                sgd_update_reference(rq, g.astype(np.float64), rvel, 0.1, mom, wd)
                res = {"p": rel(d[0].copy_to_host(), rq), "dtype": str(d[0].copy_to_host().dtype)}
                if mom:
                    res["velocity"] = rel(d[2].copy_to_host(), rvel)
                else:
                    res["velocity_untouched"] = np.array_equal(d[2].copy_to_host(), velq)
                out[f"sgd_{mom}_{dt.__name__}_{wd}_{scale}"] = res

# grid stride: one block of 256 threads walks 700 elements
ok.MAX_BLOCKS = 1
p, g, m, v, vel = state(700, np.float64)
rp, rm, rv = p.copy(), m.copy(), v.copy()
(q, mq, vq), _ = adam_gpu(p, g, m, v, 1, 0.01)
adam_update_reference(rp, g, rm, rv, LR, B1, B2, EPS, 0.01, 1)
out["grid_stride"] = max(rel(q, rp), rel(mq, rm), rel(vq, rv))
ok.MAX_BLOCKS = 1 << 16

# determinism: the same update twice gives the same bits
rng = np.random.default_rng(5)
a1, _ = adam_gpu(*state(301, np.float32)[:4], 2, 0.01)
rng = np.random.default_rng(5)
a2, _ = adam_gpu(*state(301, np.float32)[:4], 2, 0.01)
out["deterministic"] = all(np.array_equal(x, y) for x, y in zip(a1, a2))

# a NaN gradient propagates (a diverging run must stay visible), empty arrays are a no-op
p = np.ones(5); g = np.array([0, np.nan, 0, 0, 0.0])
d = [nbcuda.to_device(x) for x in (p, g, np.zeros(5), np.zeros(5))]
ok.adam(*d, 1e-3, 0.9, 0.1, 0.999, 0.001, 1.0, 1e-8, 0.0)
out["nan"] = [bool(x) for x in np.isnan(d[0].copy_to_host())]
e = nbcuda.to_device(np.zeros(0))
ok.sgd_plain(e, e, 0.1, 0.0)
out["empty_ok"] = True


d64, d32 = nbcuda.to_device(np.zeros(8)), nbcuda.to_device(np.zeros(8, np.float32))
out["errors"] = {
    "dtype_mismatch": error(lambda: ok.sgd_plain(d64, d32, 0.1, 0.0)),
    "size_mismatch": error(lambda: ok.sgd(d64, d64, nbcuda.to_device(np.zeros(7)), 0.1, 0.9, 0.0)),
    "host_array": error(lambda: ok.sgd_plain(d64, np.zeros(8), 0.1, 0.0)),
    "int_dtype": error(lambda: ok.sgd_plain(nbcuda.to_device(np.zeros(8, np.int32)), nbcuda.to_device(np.zeros(8, np.int32)), 0.1, 0.0)),
    "non_contiguous": error(lambda: ok.sgd_plain(nbcuda.to_device(np.zeros(16))[::2], d64, 0.1, 0.0)),
}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def sim():
    return run_simulator(_SIM_CODE)


CASES = [(dt, wd, scale) for dt in ("float64", "float32") for wd in (0.0, 0.05) for scale in (1.0, 1e3)]


def _tol(dtype):
    return 1e-12 if dtype == "float64" else 2e-6


@pytest.mark.parametrize("dt, wd, scale", CASES)
def test_adam_matches_reference_over_three_steps(sim, dt, wd, scale):
    r = sim[f"adam_{dt}_{wd}_{scale}"]
    assert r["dtype"] == dt and r["g_untouched"] and r["finite"]
    assert max(r["err"]) < _tol(dt), r["err"]


@pytest.mark.parametrize("mom", [0.0, 0.9])
@pytest.mark.parametrize("dt, wd, scale", CASES)
def test_sgd_matches_reference(sim, dt, wd, scale, mom):
    r = sim[f"sgd_{mom}_{dt}_{wd}_{scale}"]
    assert r["dtype"] == dt
    assert r["p"] < _tol(dt), r
    if mom:
        assert r["velocity"] < _tol(dt), r
    else:
        assert r["velocity_untouched"]


def test_grid_stride_determinism_nan_and_empty(sim):
    assert sim["grid_stride"] < 1e-12
    assert sim["deterministic"]
    assert sim["nan"] == [False, True, False, False, False]
    assert sim["empty_ok"]


@pytest.mark.parametrize("case, words", [
    ("dtype_mismatch", ["g must match p", "float32"]),
    ("size_mismatch", ["velocity must match p", "7"]),
    ("host_array", ["numba device arrays", "ndarray"]),
    ("int_dtype", ["float32 or float64", "int32"]),
    ("non_contiguous", ["C-contiguous"]),
])
def test_bad_arrays_raise_a_clear_value_error(sim, case, words):
    msg = sim["errors"][case]
    assert msg is not None and msg.startswith("ValueError: "), msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_cupy_updates_in_place_on_a_side_stream(dtype):
    cp = _gpu()
    from bll_ref.gpu import optim_kernels as ok
    from bll_ref.optim import adam_update_reference, sgd_update_reference
    rng = np.random.default_rng(2)
    n = 8192 * 129 + 7          # odd size: the last block is partly idle
    p, g, m, vel = (rng.standard_normal(n).astype(dtype) for _ in range(4))
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    tol = _tol(np.dtype(dtype).name)
    with cp.cuda.Stream(non_blocking=True) as stream:
        d = {k: cp.asarray(x) for k, x in dict(p=p, g=g, m=m, v=v, vel=vel).items()}
        ptrs = {k: x.data.ptr for k, x in d.items()}
        c1, c2 = 1 - 0.9 ** 2, 1 - 0.999 ** 2
        ok.adam(d["p"], d["g"], d["m"], d["v"], 1e-3 / c1, 0.9, 0.1, 0.999, 0.001, 1 / math.sqrt(c2), 1e-8, 0.01)
        rp, rm, rv = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
        adam_update_reference(rp, g.astype(np.float64), rm, rv, 1e-3, 0.9, 0.999, 1e-8, 0.01, 2)
        for k, r in (("p", rp), ("m", rm), ("v", rv)):
            assert float(np.max(np.abs(cp.asnumpy(d[k]) - r))) <= tol * np.max(np.abs(r)), k
        q, rq, rvel = d["p"].copy(), rp.copy(), vel.astype(np.float64)
        ok.sgd(q, d["g"], d["vel"], 0.1, 0.9, 0.01)
        sgd_update_reference(rq, g.astype(np.float64), rvel, 0.1, 0.9, 0.01)
        assert float(np.max(np.abs(cp.asnumpy(q) - rq))) <= tol * np.max(np.abs(rq))
        ok.sgd_plain(q, d["g"], 0.1, 0.0)
        stream.synchronize()
    assert all(d[k].data.ptr == ptrs[k] for k in d), "updates must be in place"
