"""Exponential families and the NumPy reference of the local estimators (bll_ref.losses.local).

Finite differences in float64 pin every gradient; hand-computed cases pin the formulas; the
printed Eq. 8 / S12 / S13 are checked against the exact chain rule of Eq. 7 and the documented gap.
"""
import math
import warnings

import numpy as np
import pytest

from bll_ref.gradcheck import numeric_gradient
from bll_ref.losses import expfam, local
from bll_ref.losses.expfam import Bernoulli, Gaussian, Poisson, get_family

FAMILIES = ["bernoulli", "gaussian", Gaussian(2.5), "poisson"]
PRINTED = {  # estimator, family it belongs to, extra kwargs
    "bernoulli_eq8": (local.bernoulli_eq8, Bernoulli(), {}),
    "gaussian_s12": (local.gaussian_s12, Gaussian(1.0), {}),
    "gaussian_s12_s2": (local.gaussian_s12, Gaussian(2.5), {"s2": 2.5}),
    "poisson_s13": (local.poisson_s13, Poisson(), {}),
}


def assert_fd(g, fd):
    """Analytic gradient vs central differences (absolute floor: some gradients are exactly 0)."""
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def _pair(rng, shape=(3, 4), scale=1.5):
    return rng.standard_normal(shape) * scale, rng.standard_normal(shape) * scale


# ------------------------------------------------------------------------------ expfam
@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_family_mu_is_dA_and_var_is_dmu(family):
    fam = get_family(family)
    eta = np.random.default_rng(0).standard_normal((2, 5)) * 2
    assert_fd(fam.mu(eta), numeric_gradient(lambda: float(np.sum(fam.log_partition(eta))), eta))
    assert_fd(fam.var(eta), numeric_gradient(lambda: float(np.sum(fam.mu(eta))), eta))


def test_family_values_by_hand():
    x = np.array([0.0, 1.0, -2.0])
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(expfam.bernoulli.mu(x), s, rtol=1e-15)
    np.testing.assert_allclose(expfam.bernoulli.var(x), s * (1 - s), rtol=1e-14)
    np.testing.assert_allclose(expfam.bernoulli.log_partition(x), np.log(1 + np.exp(x)), rtol=1e-15)
    g = Gaussian(3.0)
    np.testing.assert_allclose(g.mu(x), 3 * x)
    np.testing.assert_allclose(g.var(x), [3.0, 3.0, 3.0])
    np.testing.assert_allclose(g.log_partition(x), 1.5 * x**2)
    np.testing.assert_allclose(expfam.poisson.mu(x), np.exp(x), rtol=1e-15)
    assert expfam.poisson.mu(np.array([1e3]))[0] == np.exp(80.0)  # documented clip


def test_bernoulli_var_does_not_cancel_at_saturation():
    # rho (1 - rho) computed as mu * (1 - mu) would be exactly 0 here in float32.
    v = expfam.bernoulli.var(np.array([30.0, -30.0], np.float32))
    np.testing.assert_allclose(v, np.exp(-30.0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_family_functions_are_finite_and_silent_at_1e3(family, dtype):
    fam = get_family(family)
    eta = np.array([-1e3, -100.0, -1.0, 0.0, 1.0, 100.0, 1e3], dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for f in (fam.mu, fam.var, fam.log_partition):
            out = f(eta)
            assert out.dtype == dtype and np.all(np.isfinite(out))


def test_get_family_accepts_names_and_objects_and_rejects_others():
    assert get_family("bernoulli") is expfam.bernoulli
    assert get_family("Gaussian") == Gaussian(1.0)
    p = Poisson(eta_max=20.0)
    assert get_family(p) is p
    for bad in ("binomial", None, 3, "gauss"):
        with pytest.raises(ValueError, match="unknown exponential family"):
            get_family(bad)
    with pytest.raises(ValueError, match="s2"):
        Gaussian(0.0)
    with pytest.raises(ValueError, match="eta_max"):
        Poisson(eta_max=100.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        expfam.bernoulli.mu(np.array([1, 2]))


# ------------------------------------------------------------------------- KL and Eq. 7
@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_ef_gradients_equal_finite_differences_of_kl(family):
    rng = np.random.default_rng(1)
    phi, gamma = _pair(rng)
    g_phi, g_gamma = local.ef_gradients(family, phi, gamma)
    assert_fd(g_phi, numeric_gradient(lambda: local.kl(family, phi, gamma), phi))
    assert_fd(g_gamma, numeric_gradient(lambda: local.kl(family, phi, gamma), gamma))


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_kl_is_nonnegative_and_zero_on_the_diagonal(family):
    rng = np.random.default_rng(2)
    phi, gamma = _pair(rng, (20, 7), 3.0)
    assert local.kl(family, phi, gamma) > 0
    assert local.kl(family, phi, phi) == 0.0
    loss, g_phi, g_gamma = local.kl_ef_gradients(family, phi, phi)
    assert loss == 0.0 and not g_phi.any() and not g_gamma.any()


def test_kl_bernoulli_matches_the_textbook_formula():
    phi, gamma = np.array([[0.3, -1.2]]), np.array([[1.1, 0.4]])
    r, q = 1 / (1 + np.exp(-gamma)), 1 / (1 + np.exp(-phi))
    want = np.sum(r * np.log(r / q) + (1 - r) * np.log((1 - r) / (1 - q)))
    assert local.kl("bernoulli", phi, gamma) == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_ef_chain_rule_is_the_true_gradient_of_kl_of_a_and_b(family):
    rng = np.random.default_rng(3)
    a, b = _pair(rng)
    m = 0.37
    loss, g_a, g_b = local.ef_chain_rule(family, a, b, m)
    f = lambda: local.kl(family, a, a + m * b)  # noqa: E731
    assert loss == f()
    assert_fd(g_a, numeric_gradient(f, a))
    assert_fd(g_b, numeric_gradient(f, b))


# ------------------------------------------------------------- Eq. 8, S12, S13 as printed
@pytest.mark.parametrize("name", list(PRINTED))
def test_printed_estimator_equals_kl_gradient_at_m1(name):
    est, fam, kw = PRINTED[name]
    rng = np.random.default_rng(4)
    a, b = _pair(rng)
    loss, g_a, g_b = est(a, b, 1.0, **kw)
    loss_c, c_a, c_b = local.ef_chain_rule(fam, a, b, 1.0)
    assert loss == loss_c
    np.testing.assert_allclose(g_a, c_a, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_b, c_b, rtol=1e-12, atol=1e-15)
    # ... and that is the gradient of kl(a, a + b), by finite differences
    f = lambda: local.kl(fam, a, a + b)  # noqa: E731
    assert_fd(g_a, numeric_gradient(f, a))
    assert_fd(g_b, numeric_gradient(f, b))


@pytest.mark.parametrize("name", list(PRINTED))
def test_printed_estimator_differs_from_chain_rule_by_documented_gap(name):
    est, fam, kw = PRINTED[name]
    rng = np.random.default_rng(5)
    a, b = _pair(rng)
    m, n = 0.5, a.shape[0]
    _, g_a, g_b = est(a, b, m, **kw)
    _, c_a, c_b = local.ef_chain_rule(fam, a, b, m)
    d_a, d_b = local.eq8_chain_rule_gap(fam, a, b, m)
    np.testing.assert_allclose(g_a - c_a, d_a, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(g_b - c_b, d_b, rtol=1e-10, atol=1e-15)
    # the gap written out: (1 - m) var(gamma) b / N and (1 - m^2) var(gamma) b / N
    var = fam.var(a + m * b)
    np.testing.assert_allclose(d_a, (1 - m) * var * b / n, rtol=1e-14)
    np.testing.assert_allclose(d_b, (1 - m**2) * var * b / n, rtol=1e-14)
    assert np.abs(d_a).max() > 1e-3  # really differs at m != 1


def test_eq8_is_the_printed_formula():
    rng = np.random.default_rng(6)
    a, b = _pair(rng, (4, 3))
    m, n = 0.25, 4
    rho, alpha = 1 / (1 + np.exp(-(a + m * b))), 1 / (1 + np.exp(-a))
    _, g_a, g_b = local.bernoulli_eq8(a, b, m)
    np.testing.assert_allclose(g_a, (-(rho - alpha) + rho * (1 - rho) * b) / n, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(g_b, rho * (1 - rho) * b / n, rtol=1e-12, atol=1e-16)


def test_gaussian_s12_reading():
    # S12 at s2 = 1 with m inserted as in Eq. 9: g_a = (1 - m) b / N, g_b = b / N.
    rng = np.random.default_rng(7)
    a, b = _pair(rng)
    _, g_a, g_b = local.gaussian_s12(a, b, 0.3)
    np.testing.assert_allclose(g_a, 0.7 * b / 3, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_b, b / 3, rtol=1e-15)
    # s2 != 1: the forward weight carries s2, g_a = s2 (1 - m) b / N (0 at m = 1, the true gradient)
    _, g_a, g_b = local.gaussian_s12(a, b, 1.0, s2=2.5)
    np.testing.assert_allclose(g_a, 0.0, atol=1e-14)
    np.testing.assert_allclose(g_b, 2.5 * b / 3, rtol=1e-15)


@pytest.mark.parametrize("name", list(PRINTED))
def test_zero_inputs_give_zero_loss_and_gradients(name):
    est, _, kw = PRINTED[name]
    z = np.zeros((2, 3))
    loss, g_a, g_b = est(z, z, 0.5, **kw)
    assert loss == 0.0 and not g_a.any() and not g_b.any()


def test_single_elements_by_hand():
    # Bernoulli: a = 0, b = 2, m = 0.5 -> gamma = 1
    rho, alpha = 1 / (1 + math.exp(-1.0)), 0.5
    loss, g_a, g_b = local.bernoulli_eq8(np.array([[0.0]]), np.array([[2.0]]), 0.5)
    assert loss == pytest.approx(math.log(2) - math.log(1 + math.e) + rho, rel=1e-14)
    assert g_a[0, 0] == pytest.approx(-(rho - alpha) + rho * (1 - rho) * 2, rel=1e-14)
    assert g_b[0, 0] == pytest.approx(rho * (1 - rho) * 2, rel=1e-14)
    # Gaussian s2 = 2: a = 1, b = 2, m = 0.5 -> KL = s2 (m b)^2 / 2 = 1, g_a = s2 (1 - m) b = 2, g_b = s2 b = 4
    loss, g_a, g_b = local.gaussian_s12(np.array([[1.0]]), np.array([[2.0]]), 0.5, s2=2.0)
    assert (loss, g_a[0, 0], g_b[0, 0]) == pytest.approx((1.0, 2.0, 4.0), rel=1e-15)
    # Poisson: a = 0, b = 1, m = 1 -> rho = e, alpha = 1: KL = 1 - e + e = 1, g_a = -(e - 1) + e = 1, g_b = e
    loss, g_a, g_b = local.poisson_s13(np.array([[0.0]]), np.array([[1.0]]), 1.0)
    assert (loss, g_a[0, 0], g_b[0, 0]) == pytest.approx((1.0, 1.0, math.e), rel=1e-14)


@pytest.mark.parametrize("name", list(PRINTED))
def test_loss_is_batch_mean_of_unit_sum_and_gradients_carry_1_over_n(name):
    est, _, kw = PRINTED[name]
    rng = np.random.default_rng(8)
    a, b = _pair(rng, (1, 5))
    l1, ga1, gb1 = est(a, b, 0.6, **kw)
    l3, ga3, gb3 = est(np.repeat(a, 3, 0), np.repeat(b, 3, 0), 0.6, **kw)
    assert l3 == pytest.approx(l1, rel=1e-14)
    np.testing.assert_allclose(ga3, np.repeat(ga1, 3, 0) / 3, rtol=1e-14)
    np.testing.assert_allclose(gb3, np.repeat(gb1, 3, 0) / 3, rtol=1e-14)


def test_shapes_beyond_2d_and_dtypes_are_kept():
    rng = np.random.default_rng(9)
    a, b = (x.astype(np.float32) for x in _pair(rng, (2, 3, 4, 5)))
    for est, _, kw in PRINTED.values():
        loss, g_a, g_b = est(a, b, 0.5, **kw)
        assert isinstance(loss, float)
        assert g_a.shape == g_b.shape == a.shape and g_a.dtype == g_b.dtype == np.float32
    for fam in FAMILIES:
        g_phi, g_gamma = local.ef_gradients(fam, a, b)
        assert g_phi.dtype == np.float32 and g_gamma.shape == a.shape


# --------------------------------------------------------------------------- extremes
def _extreme_inputs(dtype):
    v = np.array([-1e3, -80.0, -1.0, 0.0, 1e-3, 1.0, 80.0, 1e3])
    a, b = np.meshgrid(v, v, indexing="ij")
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_values_are_finite_and_raise_no_warning(dtype):
    a, b = _extreme_inputs(dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for m in (0.0, 0.5, 1.0):
            for est, _, kw in PRINTED.values():
                loss, g_a, g_b = est(a, b, m, **kw)
                assert math.isfinite(loss) and np.all(np.isfinite(g_a)) and np.all(np.isfinite(g_b))
            for fam in FAMILIES:
                out = local.kl_ef_gradients(fam, a, b)
                assert math.isfinite(out[0]) and all(np.all(np.isfinite(g)) for g in out[1:])
                out = local.ef_chain_rule(fam, a, b, m)
                assert all(np.all(np.isfinite(g)) for g in out[1:])


# ------------------------------------------------------------------------------ mixing
def test_mixing_schedule_values():
    assert local.mixing(0) == 1.0
    assert local.mixing(1) == pytest.approx(1 / 1.5)
    assert local.mixing(4) == pytest.approx(1 / 3)
    assert local.mixing(2, tau=2.0) == pytest.approx(0.2)
    assert local.mixing(10, tau=0.0) == 1.0
    for bad in [(-1, 0.5), (1, -0.1), (float("nan"), 0.5), (1, float("inf")), ("x", 0.5)]:
        with pytest.raises(ValueError):
            local.mixing(*bad)


# ------------------------------------------------------------------------ S15 - S17
def test_s15_direction_and_value_by_hand():
    # KL(N(0, 1) || N(1, 4)) = 1/2 (log 4 + (1 + 1) / 4 - 1); the other direction would differ.
    one = lambda v: np.array([[v]])  # noqa: E731
    loss, g_mu, g_s = local.gaussian_kl_s15(one(1.0), one(math.log(4)), one(0.0), one(0.0))
    assert loss == pytest.approx(0.5 * (math.log(4) + 0.5 - 1), rel=1e-14)
    assert g_mu[0, 0] == pytest.approx(1 / 4)            # (mu - mu*) e^{-s}
    assert g_s[0, 0] == pytest.approx(0.5 * (1 - 2 / 4))  # (1 - (e^{s*} + d^2) e^{-s}) / 2


def test_s15_zero_when_prediction_equals_target():
    rng = np.random.default_rng(10)
    mu, s = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    loss, g_mu, g_s = local.gaussian_kl_s15(mu, s, mu, s)
    assert loss == pytest.approx(0.0, abs=1e-14)
    np.testing.assert_allclose(g_mu, 0.0, atol=1e-15)
    np.testing.assert_allclose(g_s, 0.0, atol=1e-15)


def test_s15_gradients_equal_finite_differences():
    rng = np.random.default_rng(11)
    mu, s, mu_t, s_t = (rng.standard_normal((3, 4)) for _ in range(4))
    loss, g_mu, g_s = local.gaussian_kl_s15(mu, s, mu_t, s_t)
    f = lambda: local.gaussian_kl_s15(mu, s, mu_t, s_t)[0]  # noqa: E731
    assert_fd(g_mu, numeric_gradient(f, mu))
    assert_fd(g_s, numeric_gradient(f, s))


def test_s15_extremes_are_clipped_finite_and_silent():
    mu = np.array([[1e3, -1e3, 0.0, 5.0]], np.float32)
    s = np.array([[-1e3, 1e3, 60.0, -60.0]], np.float32)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        loss, g_mu, g_s = local.gaussian_kl_s15(mu, s, -mu, s[:, ::-1].copy())
        mm, me = local.uncertainty_metrics_s16_s17(mu, s, -mu)
    assert math.isfinite(loss) and math.isfinite(mm) and math.isfinite(me)
    assert g_mu.dtype == np.float32 and np.all(np.isfinite(g_mu))
    assert not g_s.any()  # every |s| > LOGVAR_BOUND: the clipped loss is flat there


def test_uncertainty_metrics_by_hand():
    mu, s, mu_t = np.array([[1.0, 2.0]]), np.array([[0.0, math.log(2)]]), np.array([[0.0, 0.0]])
    mm, me = local.uncertainty_metrics_s16_s17(mu, s, mu_t)
    # squared errors 1, 4; predicted variances 1, 2 -> mean of (0^2, 2^2) = 2
    assert mm == pytest.approx(2.0, rel=1e-14)
    assert me == pytest.approx(math.log(2) / 2, rel=1e-14)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call", [
    lambda a, b: local.bernoulli_eq8(a, b, 0.5),
    lambda a, b: local.gaussian_s12(a, b, 0.5),
    lambda a, b: local.poisson_s13(a, b, 0.5),
    lambda a, b: local.kl("bernoulli", a, b),
    lambda a, b: local.ef_gradients("poisson", a, b),
    lambda a, b: local.gaussian_kl_s15(a, b, a, b),
])
def test_bad_inputs_raise_value_error(call):
    good = np.zeros((2, 3))
    with pytest.raises(ValueError, match="same shape"):
        call(good, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="float32 or float64"):
        call(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="float32 or float64"):
        call(good, np.zeros((2, 3), np.float16))
    with pytest.raises(ValueError, match="batch"):
        call(np.zeros((0, 3)), np.zeros((0, 3)))


def test_bad_family_and_mixing_raise_value_error():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown exponential family"):
        local.kl("laplace", z, z)
    for m in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="mixing"):
            local.bernoulli_eq8(z, z, m)
    with pytest.raises(ValueError, match="s2"):
        local.gaussian_s12(z, z, 0.5, s2=-1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise_value_error(bad):
    a, b = np.zeros((2, 3)), np.ones((2, 3))
    a[1, 2] = bad
    with np.errstate(all="ignore"):
        for est, _, kw in PRINTED.values():
            with pytest.raises(ValueError, match="NaN or inf"):
                est(a, b, 0.5, **kw)
            with pytest.raises(ValueError, match="NaN or inf"):
                est(b, a, 0.5, **kw)
        for fam in FAMILIES:
            with pytest.raises(ValueError, match="NaN or inf"):
                local.kl_ef_gradients(fam, b, a)
        with pytest.raises(ValueError, match="NaN or inf"):
            local.gaussian_kl_s15(a, b, b, b)
