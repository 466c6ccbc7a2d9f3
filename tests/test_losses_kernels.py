"""Fused Numba kernels (bll_ref.losses.kernels) and numba.cuda kernels against the NumPy reference.

Agreement is measured per element against the size of the terms that make up each output
(|mu(gamma)| + |mu(phi)| + var(gamma)(|b| + |gamma| + |phi|), over N), because the outputs are
differences of nearly equal terms (rho - alpha at saturation): 1e-12 of that in float64 (the
kernels reach ~5e-16), 16 float32 epsilons in float32 (they reach ~3).
"""
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from bll_ref.losses import expfam, kernels, local
from bll_ref.losses.expfam import Gaussian, Poisson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {np.float64: 1e-12, np.float32: 16 * np.finfo(np.float32).eps}

# name -> (kernel, reference, family, m or None for the (phi, gamma) KL/EF form, kwargs)
ESTIMATORS = {
    "kl_ef_bernoulli": (kernels.kl_ef_gradients, local.kl_ef_gradients, "bernoulli", None, {}),
    "kl_ef_gaussian": (kernels.kl_ef_gradients, local.kl_ef_gradients, "gaussian", None, {}),
    "kl_ef_gaussian_s2": (kernels.kl_ef_gradients, local.kl_ef_gradients, Gaussian(0.3), None, {}),
    "kl_ef_poisson": (kernels.kl_ef_gradients, local.kl_ef_gradients, "poisson", None, {}),
    "kl_ef_poisson_eta20": (kernels.kl_ef_gradients, local.kl_ef_gradients, Poisson(20.0), None, {}),
    "bernoulli_eq8": (kernels.bernoulli_eq8, local.bernoulli_eq8, "bernoulli", 0.3, {}),
    "gaussian_s12": (kernels.gaussian_s12, local.gaussian_s12, "gaussian", 0.3, {}),
    "gaussian_s12_s2": (kernels.gaussian_s12, local.gaussian_s12, Gaussian(2.5), 0.7, {"s2": 2.5}),
    "poisson_s13": (kernels.poisson_s13, local.poisson_s13, "poisson", 0.3, {}),
}


def _call(fn, family, m, kw, x, y, **extra):
    if m is None:
        return fn(family, x, y, **extra)
    return fn(x, y, m, **kw, **extra)


def _scales(family, m, x, y):
    """Per-element size of the terms in each gradient, and the loss's, in float64."""
    fam = expfam.get_family(family)
    x, y = x.astype(np.float64), y.astype(np.float64)
    g = y if m is None else x + m * y
    b = 0.0 if m is None else np.abs(y)
    n = x.shape[0]
    with np.errstate(under="ignore"):
        s_grad = (np.abs(fam.mu(g)) + np.abs(fam.mu(x)) + fam.var(g) * (b + np.abs(g) + np.abs(x))) / n
        s_loss = np.sum(np.abs(fam.log_partition(x)) + np.abs(fam.log_partition(g))
                        + np.abs(fam.mu(g)) * (np.abs(x) + np.abs(g))) / n
    return s_grad, s_loss


def assert_matches_reference(name, x, y, **extra):
    kern, ref, family, m, kw = ESTIMATORS[name]
    dtype = x.dtype.type
    r = _call(ref, family, m, kw, x, y)
    k = _call(kern, family, m, kw, x, y, **extra)
    s_grad, s_loss = _scales(family, m, x, y)
    tol, tiny = TOL[dtype], np.finfo(dtype).tiny
    assert isinstance(k[0], float)
    assert abs(k[0] - r[0]) <= tol * s_loss + tiny, (name, k[0], r[0])
    for kg, rg in zip(k[1:], r[1:]):
        assert kg.dtype == x.dtype and kg.shape == x.shape
        err = np.abs(kg.astype(np.float64) - rg.astype(np.float64))
        assert np.all(err <= tol * s_grad + tiny), (name, float(np.max(err / (s_grad + tiny))))


def _random_pair(rng, shape, dtype):
    """Values across scales 0.01 .. 1e3 plus the corners (+-1e3, 0) of the promised range."""
    a = rng.standard_normal(shape) * rng.choice([0.01, 1.0, 10.0, 100.0, 1e3], size=shape)
    b = rng.standard_normal(shape) * rng.choice([0.01, 1.0, 10.0, 100.0, 1e3], size=shape)
    corners = [(1e3, -1e3), (-1e3, 1e3), (0.0, 1e3), (1e3, 1e3), (-1e3, -1e3), (0.0, 0.0)]
    for i, (u, v) in enumerate(corners[: a.size]):
        a.flat[i], b.flat[i] = u, v
    return np.clip(a, -1e3, 1e3).astype(dtype), np.clip(b, -1e3, 1e3).astype(dtype)


SHAPES = [(1, 1), (1, 17), (7, 5, 3), (3, 1025), (16, 64)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_kernel_matches_reference(name, dtype):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for shape in SHAPES:
        assert_matches_reference(name, *_random_pair(rng, shape, dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_kernels_are_finite_and_silent_at_extremes(dtype):
    v = np.array([-1e3, -100.0, -1.0, 0.0, 1e-3, 1.0, 88.0, 100.0, 1e3])
    a, b = (x.astype(dtype) for x in np.meshgrid(v, v, indexing="ij"))
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for name, (kern, _, family, m, kw) in ESTIMATORS.items():
            for mm in ((None,) if m is None else (0.0, 0.5, 1.0)):
                loss, g1, g2 = _call(kern, family, mm, kw, a, b)
                assert math.isfinite(loss) and np.all(np.isfinite(g1)) and np.all(np.isfinite(g2)), name
    for name in ESTIMATORS:
        assert_matches_reference(name, a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_kernels_write_no_subnormal_gradients(dtype):
    """Saturated units make rho (1 - rho) b underflow; subnormal gradients slow the weight GEMM
    that reads them many times, so the kernels flush them to 0 (the reference keeps them)."""
    tiny = np.finfo(dtype).tiny
    lo = -90.0 if dtype == np.float32 else -715.0          # e^lo is subnormal
    a = np.linspace(lo, lo + 6.0, 4096).reshape(4, -1).astype(dtype)
    b = np.full_like(a, 0.5)
    def subnormal(g):
        return int(np.sum((g != 0) & (np.abs(g) < tiny)))
    assert subnormal(local.bernoulli_eq8(a, b, 0.5)[2]) > 0   # the reference has them: the check can fail
    for name, (kern, _, family, m, kw) in ESTIMATORS.items():
        for x, y in ((a, b), (b, a), (a, a + dtype(2.0))):
            _, g1, g2 = _call(kern, family, m, kw, x, y)
            assert subnormal(g1) == 0 and subnormal(g2) == 0, name


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_parallel_kernel_equals_serial_kernel(name):
    kern, _, family, m, kw = ESTIMATORS[name]
    a, b = _random_pair(np.random.default_rng(3), (9, 33), np.float64)
    s = _call(kern, family, m, kw, a, b, parallel=False)
    p = _call(kern, family, m, kw, a, b, parallel=True)
    assert s[0] == p[0] and np.array_equal(s[1], p[1]) and np.array_equal(s[2], p[2])


def test_benchmarked_size_runs_serially_by_default():
    # prange costs more than it saves at 128 x 1024 on the 2-core reference machine
    # (benchmarks/bench_kernels.py); larger batches go parallel unless parallel=False.
    assert 128 * 1024 < kernels.PARALLEL_MIN_SIZE <= 4096 * 1024


def test_wrappers_kl_and_ef_gradients_have_local_signatures():
    a, b = _random_pair(np.random.default_rng(5), (4, 6), np.float64)
    for fam in ("bernoulli", "gaussian", "poisson"):
        assert kernels.kl(fam, a, b) == pytest.approx(local.kl(fam, a, b), rel=1e-12)
        for kg, rg in zip(kernels.ef_gradients(fam, a, b), local.ef_gradients(fam, a, b)):
            np.testing.assert_allclose(kg, rg, rtol=1e-10, atol=1e-14)


def test_non_contiguous_input_is_handled():
    a, b = _random_pair(np.random.default_rng(6), (8, 12), np.float64)
    at, bt = a.T, b.T  # (12, 8) views, Fortran order
    k = kernels.bernoulli_eq8(at, bt, 0.4)
    r = local.bernoulli_eq8(at, bt, 0.4)
    assert k[0] == pytest.approx(r[0], rel=1e-12)
    np.testing.assert_allclose(k[1], r[1], rtol=1e-12, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 40), m=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([0.1, 3.0, 50.0, 1e3]))
def test_eq8_kernel_matches_reference_property(n, d, m, seed, scale):
    rng = np.random.default_rng(seed)
    a = np.clip(rng.standard_normal((n, d)) * scale, -1e3, 1e3)
    b = np.clip(rng.standard_normal((n, d)) * scale, -1e3, 1e3)
    k = kernels.bernoulli_eq8(a, b, m)
    r = local.bernoulli_eq8(a, b, m)
    s_grad, s_loss = _scales("bernoulli", m, a, b)
    assert abs(k[0] - r[0]) <= 1e-12 * s_loss + 1e-300
    for kg, rg in zip(k[1:], r[1:]):
        assert np.all(np.abs(kg - rg) <= 1e-12 * s_grad + 1e-300)


@pytest.mark.parametrize("call", [
    lambda a, b: kernels.bernoulli_eq8(a, b, 0.5),
    lambda a, b: kernels.gaussian_s12(a, b, 0.5),
    lambda a, b: kernels.poisson_s13(a, b, 0.5),
    lambda a, b: kernels.kl_ef_gradients("gaussian", a, b),
])
def test_kernel_wrappers_validate_input(call):
    with pytest.raises(ValueError, match="same shape"):
        call(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="float32 or float64"):
        call(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="batch"):
        call(np.zeros(()), np.zeros(()))


def test_kernel_wrappers_reject_bad_family_and_m():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown exponential family"):
        kernels.kl("cauchy", z, z)
    with pytest.raises(ValueError, match="mixing"):
        kernels.bernoulli_eq8(z, z, 2.0)


# ------------------------------------------------------------- elementary functions
@njit(cache=True)
def _map_exp(x, out):
    for i in range(x.size):
        out[i] = kernels._exp(x[i])


@njit(cache=True)
def _map_log1p(x, out):
    for i in range(x.size):
        out[i] = kernels._log1p(x[i])


@pytest.mark.parametrize("dtype,ulps", [(np.float64, 2), (np.float32, 2)])
def test_vectorisable_exp_and_log1p_are_accurate(dtype, ulps):
    eps = np.finfo(dtype).eps
    lo = -700.0 if dtype == np.float64 else -87.0
    x = np.concatenate([np.linspace(lo, 88.0, 20001), [0.0, -1e-30, 1e-30]]).astype(dtype)
    out = np.empty_like(x)
    _map_exp(x, out)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - want) / want) <= ulps * eps
    z = np.concatenate([np.linspace(-0.5, 1.0, 20001), np.logspace(-300 if dtype == np.float64 else -37, 0, 200)])
    z = z.astype(dtype)
    out = np.empty_like(z)
    _map_log1p(z, out)
    want = np.log1p(z.astype(np.float64))
    nz = want != 0
    assert np.max(np.abs(out[nz] - want[nz]) / np.abs(want[nz])) <= ulps * eps


# ----------------------------------------------------------------------- subprocesses
def _run_python(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


def test_kernels_run_as_plain_python_with_jit_disabled():
    code = """
        import json, numpy as np
        from bll_ref.losses import kernels, local
        rng = np.random.default_rng(0)
        out = {}
        for dt in (np.float64, np.float32):
            a = (rng.standard_normal((3, 5)) * 4).astype(dt); b = (rng.standard_normal((3, 5)) * 4).astype(dt)
            for name in ("bernoulli_eq8", "gaussian_s12", "poisson_s13"):
                k, r = getattr(kernels, name)(a, b, 0.6), getattr(local, name)(a, b, 0.6)
                out[name + dt.__name__] = max(abs(k[0] - r[0]) / abs(r[0]), *(float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(k[1:], r[1:])))
            for fam in ("bernoulli", "gaussian", "poisson"):
                k, r = kernels.kl_ef_gradients(fam, a, b), local.kl_ef_gradients(fam, a, b)
                out[fam + dt.__name__] = max(abs(k[0] - r[0]) / abs(r[0]), *(float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(k[1:], r[1:])))
            k, r = kernels.bernoulli_eq8(a, b, 0.6, parallel=True), kernels.bernoulli_eq8(a, b, 0.6, parallel=False)
            out["prange" + dt.__name__] = max(abs(k[0] - r[0]), *(float(np.max(np.abs(x - y))) for x, y in zip(k[1:], r[1:])))
        import numba
        print(json.dumps({"disabled": bool(numba.config.DISABLE_JIT), "err": out}))
    """
    res = _run_python(code, NUMBA_DISABLE_JIT="1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["disabled"]
    for key, err in out["err"].items():
        assert err < (1e-13 if key.endswith("float64") else 1e-5), (key, err)


def test_cuda_kernels_in_the_simulator():
    probe = _run_python("from numba import cuda; assert cuda.is_available()", NUMBA_ENABLE_CUDASIM="1")
    if probe.returncode != 0:
        pytest.skip(f"numba.cuda simulator cannot start here: {probe.stderr.strip().splitlines()[-1:]}")
    code = """
        import json, numpy as np
        from bll_ref.losses import cuda, local
        assert cuda.available()
        rng = np.random.default_rng(0)
        out = {}
        for dt in (np.float64, np.float32):
            a = np.clip(rng.standard_normal((3, 70)) * 30, -1e3, 1e3).astype(dt)
            b = np.clip(rng.standard_normal((3, 70)) * 30, -1e3, 1e3).astype(dt)
            a[0, :3] = [1e3, -1e3, 0.0]; b[0, :3] = [-1e3, 1e3, 1e3]
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            k, r = cuda.bernoulli_eq8(a, b, 0.4), local.bernoulli_eq8(a64, b64, 0.4)
            out["eq8" + dt.__name__] = [abs(k[0] - r[0]) / abs(r[0])] + [float(np.max(np.abs(x - y))) for x, y in zip(k[1:], r[1:])]
            out["eq8dtype" + dt.__name__] = str(k[1].dtype)
            k, r = cuda.kl_ef_gradients("gaussian", a, b), local.kl_ef_gradients("gaussian", a64, b64)
            out["gauss" + dt.__name__] = [abs(k[0] - r[0]) / abs(r[0])] + [float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(k[1:], r[1:])]
        print(json.dumps(out))
    """
    res = _run_python(code, NUMBA_ENABLE_CUDASIM="1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["eq8dtypefloat32"] == "float32"
    for key in ("eq8float64", "gaussfloat64"):
        assert max(out[key]) < 1e-12, (key, out[key])
    for key in ("eq8float32", "gaussfloat32"):  # float64 on the device, rounded once to float32
        assert max(out[key]) < 1e-6, (key, out[key])


def test_cuda_module_imports_and_refuses_cleanly_without_a_gpu():
    from bll_ref.losses import cuda
    if cuda.available():
        pytest.skip("a CUDA device (or the simulator) is available in this process")
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda.bernoulli_eq8(np.zeros((2, 2)), np.zeros((2, 2)), 0.5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_kernels_raise_on_non_finite_input(bad, dtype):
    # no extra pass over the data: a NaN or inf input always makes the (float64) loss non-finite
    for name, (kern, _, family, m, kw) in ESTIMATORS.items():
        for pos in ((0, 0), (2, 7)):
            for which in (0, 1):
                xy = [np.zeros((3, 8), dtype), np.full((3, 8), -2.0, dtype)]
                xy[which][pos] = bad
                with pytest.raises(ValueError, match="NaN or inf"):
                    _call(kern, family, m, kw, *xy)
