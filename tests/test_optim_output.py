"""Optimisers, schedules and output losses."""
import numpy as np
import pytest

from bll_ref.gradcheck import numeric_gradient, rel_error
from bll_ref.layers import Dense, Sequential
from bll_ref.losses.output import mse, softmax_cross_entropy
from bll_ref.optim import SGD, Adam, adam_update_reference, make_optimizer


def _model(dtype=np.float64, seed=0):
    return Sequential(Dense(6, 5, rng=seed, dtype=dtype), Dense(5, 3, rng=seed + 1, dtype=dtype))


def _fill_grads(model, seed):
    rng = np.random.default_rng(seed)
    model.zero_grads()
    for g in model.grads.values():
        g[...] = rng.standard_normal(g.shape)


def _step_twins(dtype, make_opt, steps=5):
    """Two equal models, the fused optimiser on one and its NumPy twin on the other, the same
    random gradients for ``steps`` steps -> (model, optimiser) pairs and the tolerance."""
    a, b = _model(dtype), _model(dtype)
    oa, ob = make_opt(a, True), make_opt(b, False)
    for step in range(steps):
        _fill_grads(a, step)
        _fill_grads(b, step)
        oa.step()
        ob.step()
    return (a, oa), (b, ob), (1e-12 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adam_equals_numpy_reference(dtype):
    (a, _), (b, _), tol = _step_twins(dtype, lambda m, fused: Adam(m, lr=1e-2, weight_decay=1e-3, fused=fused))
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 1e-2), (0.9, 0.0), (0.9, 1e-2)])
def test_fused_sgd_equals_numpy_reference(dtype, momentum, weight_decay):
    (a, oa), (b, ob), tol = _step_twins(
        dtype, lambda m, fused: SGD(m, lr=0.05, momentum=momentum, weight_decay=weight_decay, fused=fused))
    for k in a.params:
        assert a.params[k].dtype == dtype
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(oa.velocity[k], ob.velocity[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("make_opt", [lambda m, f: Adam(m, lr=1e-2, weight_decay=1e-3, fused=f),
                                      lambda m, f: SGD(m, lr=0.05, momentum=0.9, weight_decay=1e-2, fused=f),
                                      lambda m, f: SGD(m, lr=0.05, fused=f)], ids=["adam", "sgd momentum", "sgd"])
def test_steps_in_parts_make_the_whole_step_bit_for_bit(dtype, fused, make_opt):
    """``step(part=...)`` updates only elements lo:hi of the flattened parameters it names (an MPI
    replica's share, the same every step): the shares of R optimisers, put together, are the whole
    step exactly, over several steps, with cuts anywhere (inside the kernels' SIMD lanes or at
    their edges)."""
    rng, shares = np.random.default_rng(1), 3
    whole_model = _model(dtype)
    whole = make_opt(whole_model, fused)
    models = [_model(dtype) for _ in range(shares)]
    opts = [make_opt(m, fused) for m in models]
    bounds = {k: [0, *np.sort(rng.integers(0, p.size + 1, shares - 1)).tolist(), p.size]
              for k, p in whole_model.params.items()}
    for step in range(4):
        for m in (whole_model, *models):
            _fill_grads(m, step)
        whole.step()
        for q, (m, o) in enumerate(zip(models, opts)):
            part = {k: (b[q], b[q + 1]) for k, b in bounds.items()}
            before = {k: p.copy() for k, p in m.params.items()}
            o.step(part=part)
            for k, (lo, hi) in part.items():
                flat, old = m.params[k].reshape(-1), before[k].reshape(-1)
                assert np.array_equal(flat[:lo], old[:lo]) and np.array_equal(flat[hi:], old[hi:])  # only its part
        for k, p in whole_model.params.items():  # put together; then every model takes the whole, as replicas do
            got = np.concatenate([m.params[k].reshape(-1)[b0:b1]
                                  for m, b0, b1 in zip(models, bounds[k][:-1], bounds[k][1:])])
            assert np.array_equal(got, p.reshape(-1)), k
            for m in models:
                m.params[k][...] = p


def test_fused_kernels_keep_float32_and_propagate_non_finite():
    # fastmath must not drop NaN/inf: a diverging run has to stay visibly non-finite
    for opt in (Adam, lambda m: SGD(m, lr=0.1, momentum=0.9)):
        m = _model(np.float32)
        o = opt(m)
        _fill_grads(m, 0)
        m.grads["0.W"][0, 0] = np.inf
        m.grads["0.W"][1, 1] = np.nan
        o.step()
        W = m.params["0.W"]
        assert W.dtype == np.float32
        assert not np.isfinite(W[0, 0]) and np.isnan(W[1, 1])
        assert np.isfinite(W[2:]).all()


def test_adam_reference_and_kernel_agree_on_large_float32_arrays():
    # the vectorised loop has a scalar remainder: sizes not a multiple of the SIMD width
    from bll_ref.optim import _adam_kernel
    import math
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000, 4099):
        p, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
        v = np.abs(rng.standard_normal(n)).astype(np.float32)
        ref = [a.copy() for a in (p, g, m, v)]
        t, lr, b1, b2, eps, wd = 3, 1e-3, 0.9, 0.999, 1e-8, 1e-4
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        f = np.float32
        _adam_kernel(p, g, m, v, f(lr / c1), f(b1), f(1 - b1), f(b2), f(1 - b2), f(1 / math.sqrt(c2)), f(eps), f(wd))
        adam_update_reference(ref[0], ref[1], ref[2], ref[3], lr, b1, b2, eps, wd, t)
        np.testing.assert_allclose(m, ref[2], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(v, ref[3], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p, ref[0], rtol=1e-6, atol=1e-6)


def test_adam_first_step_moves_each_weight_by_lr():
    # Bias-corrected Adam's first step is lr * g / (|g| + eps): magnitude ~lr for every element.
    m = _model()
    before = {k: v.copy() for k, v in m.params.items()}
    _fill_grads(m, 3)
    grads = {k: v.copy() for k, v in m.grads.items()}
    Adam(m, lr=0.1).step()
    for k in m.params:
        np.testing.assert_allclose(before[k] - m.params[k], 0.1 * np.sign(grads[k]), rtol=1e-6)


def test_adam_reference_hand_case():
    p, g = np.array([1.0]), np.array([2.0])
    m, v = np.zeros(1), np.zeros(1)
    adam_update_reference(p, g, m, v, 0.5, 0.9, 0.999, 0.0, 0.0, 1)
    assert m[0] == pytest.approx(0.2) and v[0] == pytest.approx(0.004)
    assert p[0] == pytest.approx(0.5)  # 1 - 0.5 * (0.2/0.1) / sqrt(0.004/0.001)


def test_sgd_momentum_and_weight_decay_hand_case():
    m = Sequential(Dense(1, 1, rng=0, dtype=np.float64))
    m.params["0.W"][...] = 1.0
    m.params["0.c"][...] = 0.0
    opt = SGD(m, lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(2):
        m.zero_grads()
        m[0].grads["W"][...] = 1.0
        opt.step()
    # step 1: g = 1 + 0.5*1 = 1.5, v = 1.5, W = 0.85; step 2: g = 1 + 0.425 = 1.425, v = 2.775, W = 0.5725
    assert m.params["0.W"][0, 0] == pytest.approx(0.5725)


def test_step_before_backward_raises():
    with pytest.raises(RuntimeError, match="backward"):
        Adam(_model()).step()


def test_bad_optimizer_arguments():
    with pytest.raises(ValueError, match="unknown optimiser"):
        make_optimizer("rmsprop", _model(), 1e-3)
    with pytest.raises(ValueError, match="learning rate"):
        Adam(_model(), lr=0)


def test_cross_entropy_gradient_finite_differences():
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((4, 5)), rng.integers(0, 5, 4)
    _, dz = softmax_cross_entropy(z, y)
    num = numeric_gradient(lambda: softmax_cross_entropy(z, y)[0], z)
    assert rel_error(dz, num) < 1e-7


def test_cross_entropy_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]])
    with np.errstate(all="raise"):
        loss, dz = softmax_cross_entropy(z, np.array([0, 2]))
    assert np.isfinite(loss) and np.isfinite(dz).all()
    assert loss == pytest.approx(np.log(2) / 2)  # row 1: ~0; row 2: log 2


def test_cross_entropy_sequences_and_soft_targets_agree():
    rng = np.random.default_rng(1)
    z, y = rng.standard_normal((2, 3, 4)), rng.integers(0, 4, (2, 3))
    l1, d1 = softmax_cross_entropy(z, y)
    l2, d2 = softmax_cross_entropy(z, np.eye(4)[y])
    assert l1 == pytest.approx(l2) and np.allclose(d1, d2)


def test_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="expects integer labels"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_mse_gradient():
    rng = np.random.default_rng(2)
    p, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    _, d = mse(p, t)
    assert rel_error(d, numeric_gradient(lambda: mse(p, t)[0], p)) < 1e-7
