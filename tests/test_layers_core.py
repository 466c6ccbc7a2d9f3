"""Dense, element-wise activations, Flatten, Sequential, Residual: finite differences in float64,
input validation, protocol errors, config round trips."""
import json

import numpy as np
import pytest

from bll_ref.gradcheck import check_layer
from bll_ref.layers import (Dense, Flatten, LeakyReLU, ReLU, Residual, Sequential, Sigmoid, Tanh,
                            layer_from_config, load_state_dict, sigmoid, state_dict)

F64 = np.float64
RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.standard_normal(shape)


def _assert_grads_ok(layer, x, tol=1e-6):
    errors = check_layer(layer, x, rng=1)
    bad = {k: v for k, v in errors.items() if v > tol}
    assert not bad, f"finite-difference mismatch: {bad}"


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(n, bias):
    _assert_grads_ok(Dense(5, 4, bias=bias, rng=0, dtype=F64), _x(n, 5))


def test_dense_on_sequences_is_token_wise():
    layer = Dense(3, 2, rng=0, dtype=F64)
    x = _x(2, 4, 3)
    _assert_grads_ok(layer, x)
    np.testing.assert_allclose(layer.forward(x), np.stack([layer.forward(x[i]) for i in range(2)]))


@pytest.mark.parametrize("act", [ReLU(), LeakyReLU(0.1), Sigmoid(), Tanh()], ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 5, 3)])
def test_activation_gradients(act, shape):
    x = _x(*shape)
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the ReLU kink
    _assert_grads_ok(act, x)


def test_activation_values_by_hand():
    x = np.array([[-2.0, 0.0, 3.0]])
    np.testing.assert_array_equal(ReLU().forward(x), [[0.0, 0.0, 3.0]])
    np.testing.assert_allclose(LeakyReLU(0.1).forward(x), [[-0.2, 0.0, 3.0]])
    np.testing.assert_allclose(Sigmoid().forward(x), 1 / (1 + np.exp(-x)))
    with np.errstate(over="raise"):
        s = sigmoid(np.array([-1e4, 1e4]))
    np.testing.assert_array_equal(s, [0.0, 1.0])


def test_flatten_and_sequential_gradients():
    model = Sequential(Dense(6, 5, rng=0, dtype=F64), Tanh(), Dense(5, 4, rng=1, dtype=F64), LeakyReLU())
    _assert_grads_ok(model, _x(3, 6))
    _assert_grads_ok(Sequential(Flatten(), Dense(12, 3, rng=2, dtype=F64)), _x(2, 3, 2, 2))


@pytest.mark.parametrize("projection", [False, True])
def test_residual_gradients(projection):
    body = Sequential(Dense(4, 4, rng=0, dtype=F64), Tanh(), Dense(4, 4, rng=1, dtype=F64))
    shortcut = Sequential(Dense(4, 4, rng=2, dtype=F64)) if projection else None
    _assert_grads_ok(Residual(body, shortcut), _x(2, 4))


def test_residual_shape_mismatch_is_explained():
    r = Residual(Sequential(Dense(4, 3, rng=0, dtype=F64)))
    with pytest.raises(ValueError, match="projection shortcut"):
        r.forward(_x(2, 4))


def test_need_dx_false_gives_same_parameter_gradients():
    a, b = (Sequential(Dense(5, 3, rng=0, dtype=F64), ReLU()) for _ in range(2))
    x, dy = _x(4, 5), _x(4, 3)
    a.forward(x), b.forward(x)
    assert a.backward(dy, need_dx=False) is None
    b.backward(dy)
    for k in a.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


@pytest.mark.parametrize("layer,x,msg", [
    (Dense(5, 4), np.zeros((2, 6), np.float32), r"\(N, 5\).*\(2, 6\)"),
    (Dense(5, 4), np.zeros((2, 5), np.float64), "float32.*float64"),
    (Dense(5, 4), np.zeros(5, np.float32), "2 or 3 or 4-d"),
    (ReLU(), np.zeros((2, 3), np.int64), "float32 or float64.*int64"),
    (Sigmoid(), [[1.0]], "numpy array"),
    (Tanh(), np.zeros((0, 3)), "non-empty"),
])
def test_bad_input_raises_value_error_naming_expected_and_got(layer, x, msg):
    with pytest.raises(ValueError, match=msg):
        layer.forward(x)


@pytest.mark.parametrize("layer", [Dense(3, 2), ReLU(), LeakyReLU(), Sigmoid(), Tanh(), Flatten(),
                                   Residual(Sequential(Dense(3, 3)))], ids=lambda l: type(l).__name__)
def test_backward_before_forward_raises(layer):
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 3), np.float32))


def test_eval_forward_does_not_cache():
    d = Dense(3, 2)
    d.forward(np.zeros((2, 3), np.float32), train=False)
    with pytest.raises(RuntimeError):
        d.backward(np.zeros((2, 2), np.float32))


def test_wrong_dy_shape_raises():
    d = Dense(3, 2)
    d.forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"dy of shape \(2, 2\)"):
        d.backward(np.zeros((2, 3), np.float32))


def test_float32_is_default_and_float64_end_to_end():
    m32 = Sequential(Dense(4, 3, rng=0), Sigmoid())
    m64 = Sequential(Dense(4, 3, rng=0, dtype=F64), Sigmoid())
    x = _x(2, 4)
    assert m32.forward(x.astype(np.float32)).dtype == np.float32
    y64 = m64.forward(x)
    assert y64.dtype == F64 and m64.backward(np.ones_like(y64)).dtype == F64
    np.testing.assert_allclose(m32.forward(x.astype(np.float32)), y64, rtol=1e-6)


def test_seeded_construction_is_bitwise_reproducible():
    a, b, c = Dense(7, 5, rng=3), Dense(7, 5, rng=3), Dense(7, 5, rng=4)
    assert np.array_equal(a.params["W"], b.params["W"]) and not np.array_equal(a.params["W"], c.params["W"])
    bound = 1 / np.sqrt(7)
    assert np.abs(a.params["W"]).max() <= bound


def test_config_and_state_round_trip():
    model = Sequential(Sequential(Dense(4, 3, rng=0), LeakyReLU(0.2)),
                       Sequential(Residual(Sequential(Dense(3, 3, rng=1)), None), Flatten()))
    cfg = json.loads(json.dumps(model.config()))
    clone = layer_from_config(cfg)
    load_state_dict(clone, state_dict(model))
    x = _x(2, 4).astype(np.float32)
    np.testing.assert_array_equal(clone.forward(x), model.forward(x))
    with pytest.raises(ValueError, match="missing"):
        load_state_dict(clone, {})
    with pytest.raises(ValueError, match="unknown layer type"):
        layer_from_config({"type": "Nope"})


def test_skip_draws_makes_the_same_draws_and_zero_weights_that_hold_no_memory():
    """An MPI rank builds the model with SkipDraws: the generator ends where a real build leaves
    it, the weights are zeros of the right shape and dtype, and neither they nor the optimiser's
    moments are resident until written (np.zeros), so building a 100 MB model costs a few MB."""
    import gc

    from bll_ref import models
    from bll_ref.layers.base import SkipDraws, state_dict
    from bll_ref.memory import resident_bytes
    from bll_ref.optim import make_optimizer

    real, skip = np.random.default_rng(5), SkipDraws(5)
    a = models.mlp((30, 70, 10), rng=real)
    b = models.mlp((30, 70, 10), rng=skip)
    assert np.array_equal(real.uniform(size=4), np.random.Generator(skip.bit_generator).uniform(size=4))  # same stream
    for la, lb in zip(a, b):  # mlp returns the list of blocks
        for (ka, pa), (kb, pb) in zip(state_dict(la).items(), state_dict(lb).items()):
            assert ka == kb and pa.shape == pb.shape and pa.dtype == pb.dtype and not pb.any()
    if resident_bytes() is None:
        return  # no /proc here: the memory half cannot be observed
    # Every big array is over glibc's largest mmap threshold (32 MB), so it is a fresh mapping that
    # calloc leaves untouched, whatever earlier tests freed (smaller ones may reuse heap that calloc
    # must clear); a small build first does the lazy imports outside the measurement.
    [make_optimizer("adam", blk, 1e-3) for blk in models.mlp((8, 8, 2), rng=SkipDraws(0))]
    gc.collect()
    before = resident_bytes()
    big = models.mlp((4096, 4096, 4096, 10), rng=SkipDraws(0))  # 134 MB of float32 weights
    opts = [make_optimizer("adam", blk, 1e-3) for blk in big]  # + 268 MB of moments
    grown = resident_bytes() - before
    assert grown < 20e6, f"{grown / 1e6:.1f} MB resident after building with SkipDraws"
    del big, opts
    gc.collect()
    before = resident_bytes()
    big = models.mlp((4096, 4096, 4096, 10), rng=0)
    assert resident_bytes() - before > 100e6 and len(big) == 3  # the check can see a real build
