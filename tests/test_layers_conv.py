"""Conv2d, MaxPool2d, AvgPool2d, Upsample2d: finite differences, naive references, validation."""
import json

import numpy as np
import pytest

from bll_ref.gradcheck import check_layer
from bll_ref.layers import layer_from_config
from bll_ref.layers import AvgPool2d, Conv2d, MaxPool2d, Upsample2d

TOL = 1e-6


def naive_conv2d(x, W, c, stride, padding):
    """Direct loop over every output pixel: the specification Conv2d must match."""
    (sh, sw), (ph, pw) = stride, padding
    n, _, h, w = x.shape
    o, _, kh, kw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for b in range(n):
        for f in range(o):
            for i in range(ho):
                for j in range(wo):
                    patch = xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    y[b, f, i, j] = np.sum(patch * W[f]) + (0.0 if c is None else c[f])
    return y


def naive_pool(x, k, s, reduce):
    n, ch, h, w = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    y = np.zeros((n, ch, ho, wo))
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = reduce(x[:, :, i * s:i * s + k, j * s:j * s + k], axis=(2, 3))
    return y


# (N, C_in, H, W, C_out, kernel, stride, padding, bias)
CONV_CASES = [
    (1, 2, 7, 5, 3, 3, 1, 1, True),
    (2, 3, 7, 5, 4, 3, 2, 1, True),
    (2, 2, 6, 6, 3, 1, 1, 0, True),
    (1, 3, 5, 7, 2, 1, 2, 1, False),
    (3, 2, 5, 6, 2, (3, 2), (2, 1), (0, 1), True),
    (2, 1, 4, 4, 2, 4, 1, 0, True),  # kernel covers the whole image
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradients_match_finite_differences(case):
    n, cin, h, w, cout, k, s, p, bias = case
    rng = np.random.default_rng(1)
    layer = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, rng=rng, dtype=np.float64)
    x = rng.standard_normal((n, cin, h, w))
    errors = check_layer(layer, x, rng=2)
    assert set(errors) == {"x", *layer.params}
    assert max(errors.values()) < TOL, errors
    assert {k: v.shape for k, v in layer.grads.items()} == {k: v.shape for k, v in layer.params.items()}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_equals_naive_loop(case):
    n, cin, h, w, cout, k, s, p, bias = case
    rng = np.random.default_rng(3)
    layer = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, rng=rng, dtype=np.float64)
    x = rng.standard_normal((n, cin, h, w))
    want = naive_conv2d(x, layer.params["W"], layer.params.get("c"), layer.stride, layer.padding)
    got = layer.forward(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv2d_need_dx_false_skips_dx_and_keeps_param_grads():
    rng = np.random.default_rng(4)
    layer = Conv2d(2, 3, 3, stride=2, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 2, 7, 5))
    dy = rng.standard_normal(layer.forward(x).shape)
    layer.backward(dy)
    full = {k: v.copy() for k, v in layer.grads.items()}
    assert layer.backward(dy, need_dx=False) is None
    for k in full:
        np.testing.assert_array_equal(layer.grads[k], full[k])


def test_conv2d_init_bound_and_seeded_reproducibility():
    a = Conv2d(4, 6, 3, rng=7)
    b = Conv2d(4, 6, 3, rng=np.random.default_rng(7))
    bound = 1 / np.sqrt(4 * 3 * 3)
    for key in ("W", "c"):
        np.testing.assert_array_equal(a.params[key], b.params[key])
        assert a.params[key].dtype == np.float32
        assert np.abs(a.params[key]).max() <= bound
    assert a.params["W"].shape == (6, 4, 3, 3) and a.params["c"].shape == (6,)
    assert not np.array_equal(a.params["W"], Conv2d(4, 6, 3, rng=8).params["W"])
    assert "c" not in Conv2d(4, 6, 3, bias=False, rng=7).params


def test_conv2d_float32_forward_matches_float64():
    rng = np.random.default_rng(5)
    l32 = Conv2d(3, 4, 3, stride=2, padding=1, rng=9, dtype=np.float32)
    l64 = Conv2d(3, 4, 3, stride=2, padding=1, rng=9, dtype=np.float64)
    x = rng.standard_normal((2, 3, 7, 5))
    y32 = l32.forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, l64.forward(x), rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y32.shape)
    dx32 = l32.backward(dy.astype(np.float32))
    assert dx32.dtype == np.float32 and l32.grads["W"].dtype == np.float32
    np.testing.assert_allclose(dx32, l64.backward(dy), rtol=1e-4, atol=1e-5)


def test_conv2d_rejects_bad_input_naming_expected_and_got():
    layer = Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"float32.*got float64"):
        layer.forward(np.zeros((2, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"\(N, 3, \*, \*\).*got \(2, 2, 5, 5\)"):
        layer.forward(np.zeros((2, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"4-d.*got shape \(3, 5, 5\)"):
        layer.forward(np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r">= \(3, 3\).*got \(2, 5\)"):
        layer.forward(np.zeros((1, 3, 2, 5), np.float32))
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(3, 4, 0)
    layer.forward(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"dy of shape \(2, 4, 3, 3\), got \(2, 4, 5, 5\)"):
        layer.backward(np.zeros((2, 4, 5, 5), np.float32))


POOL_CASES = [  # (N, C, H, W, kernel, stride)
    (1, 2, 7, 5, 2, None),
    (2, 3, 6, 6, 2, None),
    (2, 2, 7, 5, 3, 2),  # overlapping windows
    (1, 1, 5, 7, 3, 1),
    (2, 2, 4, 6, 1, None),
]


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_gradients_match_finite_differences(cls, case):
    n, c, h, w, k, s = case
    rng = np.random.default_rng(6)
    errors = check_layer(cls(k, s), rng.standard_normal((n, c, h, w)), rng=2)
    assert errors["x"] < TOL, errors


@pytest.mark.parametrize("cls,reduce", [(MaxPool2d, np.max), (AvgPool2d, np.mean)])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_forward_equals_naive_loop(cls, reduce, case):
    n, c, h, w, k, s = case
    x = np.random.default_rng(7).standard_normal((n, c, h, w))
    want = naive_pool(x, k, k if s is None else s, reduce)
    np.testing.assert_allclose(cls(k, s).forward(x), want, rtol=1e-12, atol=1e-12)


def test_maxpool_routes_gradient_to_the_max_and_floors_odd_sizes():
    x = np.array([[[[1., 5., 2., 0., 9.],
                    [3., 4., 8., 1., 9.],
                    [9., 9., 9., 9., 9.]]]])
    pool = MaxPool2d(2)
    y = pool.forward(x)
    np.testing.assert_array_equal(y, [[[[5., 8.]]]])
    dx = pool.backward(np.array([[[[10., 20.]]]]))
    want = np.zeros_like(x)
    want[0, 0, 0, 1], want[0, 0, 1, 2] = 10., 20.
    np.testing.assert_array_equal(dx, want)


def test_maxpool_tie_sends_gradient_to_first_offset_only():
    pool = MaxPool2d(2, stride=1)  # overlapping windows: the shared max collects both gradients
    x = np.zeros((1, 1, 2, 3))
    pool.forward(x)
    dx = pool.backward(np.array([[[[1., 2.]]]]))
    np.testing.assert_array_equal(dx[0, 0], [[1., 2., 0.], [0., 0., 0.]])


def test_upsample2d_nearest_and_gradient():
    x = np.arange(6.0).reshape(1, 1, 2, 3)
    up = Upsample2d(2)
    y = up.forward(x)
    np.testing.assert_array_equal(y[0, 0], [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                            [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
    rng = np.random.default_rng(8)
    for s, shape in [(2, (1, 2, 3, 2)), (3, (2, 1, 2, 3)), (1, (1, 1, 2, 2))]:
        errors = check_layer(Upsample2d(s), rng.standard_normal(shape), rng=2)
        assert errors["x"] < TOL, errors


@pytest.mark.parametrize("layer", [MaxPool2d(2), AvgPool2d(3, 2), Upsample2d(2)])
def test_parameterless_layers_accept_float32_and_float64(layer):
    x = np.random.default_rng(9).standard_normal((2, 3, 7, 5))
    y64 = layer.forward(x)
    y32 = layer.forward(x.astype(np.float32))
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_allclose(y32, y64, rtol=1e-6, atol=1e-6)
    dx = layer.backward(np.ones_like(y32))
    assert dx.dtype == np.float32 and dx.shape == x.shape
    assert layer.params == {} and layer.grads == {}


@pytest.mark.parametrize("layer", [MaxPool2d(2), AvgPool2d(2), Upsample2d(2)])
def test_parameterless_layers_reject_bad_input(layer):
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} expects float32 or float64 input, got int64"):
        layer.forward(np.zeros((1, 1, 4, 4), np.int64))
    with pytest.raises(ValueError, match=rf"{name} expects a 4-d input, got shape \(4, 4\)"):
        layer.forward(np.zeros((4, 4)))
    layer.forward(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"expects dy of shape .*got \(1, 1, 3, 3\)"):
        layer.backward(np.zeros((1, 1, 3, 3)))


def test_pool_rejects_image_smaller_than_kernel():
    with pytest.raises(ValueError, match=r">= \(3, 3\).*got \(2, 5\)"):
        MaxPool2d(3).forward(np.zeros((1, 1, 2, 5)))


@pytest.mark.parametrize("make", [lambda: Conv2d(2, 3, 3), lambda: MaxPool2d(2),
                                  lambda: AvgPool2d(2), lambda: Upsample2d(2)])
def test_backward_before_forward_raises(make):
    layer = make()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 3, 2, 2), np.float32))
    layer.forward(np.zeros((1, 2, 4, 4), np.float32), train=False)  # eval forward caches nothing
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 3, 2, 2), np.float32))


@pytest.mark.parametrize("layer", [
    Conv2d(3, 5, 3, stride=2, padding=1, rng=0),
    Conv2d(2, 4, (3, 1), stride=(2, 1), padding=(1, 0), bias=False, rng=0, dtype=np.float64),
    MaxPool2d(2), MaxPool2d(3, 2), AvgPool2d((2, 3)), Upsample2d(3),
])
def test_config_round_trip(layer):
    cfg = json.loads(json.dumps(layer.config()))
    rebuilt = layer_from_config(cfg)
    assert type(rebuilt) is type(layer)
    assert rebuilt.config() == layer.config()
    assert {k: (v.shape, v.dtype) for k, v in rebuilt.params.items()} == \
        {k: (v.shape, v.dtype) for k, v in layer.params.items()}


@pytest.mark.parametrize("make", [lambda: Upsample2d(0), lambda: Upsample2d(1.5), lambda: MaxPool2d(0),
                                  lambda: AvgPool2d(2, stride=0), lambda: Conv2d(2, 3, 3, stride=0),
                                  lambda: Conv2d(2, 3, 3, padding=-1), lambda: Conv2d(0, 3, 3)])
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_small_cnn_block_gradients_through_sequential():
    from bll_ref.layers import Flatten, ReLU, Sequential
    rng = np.random.default_rng(10)
    block = Sequential(Conv2d(1, 2, 3, padding=1, rng=rng, dtype=np.float64), ReLU(), MaxPool2d(2),
                       Conv2d(2, 2, 1, rng=rng, dtype=np.float64), AvgPool2d(2), Upsample2d(2), Flatten())
    errors = check_layer(block, rng.standard_normal((2, 1, 7, 9)), rng=2)
    assert max(errors.values()) < TOL, errors
    assert block.backward(rng.standard_normal((2, 2 * 2 * 4)), need_dx=False) is None


@pytest.mark.parametrize("layer", [Conv2d(1, 1, 1, dtype=np.float64), MaxPool2d(1), AvgPool2d(1),
                                   Upsample2d(1), Upsample2d(2)])
def test_output_is_a_fresh_writeable_array(layer):
    x = np.random.default_rng(11).standard_normal((1, 1, 3, 3))
    y = layer.forward(x)
    assert y.flags.writeable and y.flags.c_contiguous and not np.shares_memory(x, y)
