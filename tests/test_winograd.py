"""Winograd F(2x2, 3x3) convolution: the Numba kernels against their NumPy twins, the twins against
the direct loop, Conv2d's Winograd path against finite differences and against its im2col path."""
import numpy as np
import pytest

from bll_ref.gradcheck import check_layer
from bll_ref.layers import layer_from_config
from bll_ref.layers import winograd as wg
from bll_ref.layers.conv import Conv2d

from test_layers_conv import naive_conv2d

# (N, C, H, W, padding): odd and even sizes (odd outputs need a cropped last tile), padding 0-2,
# a single channel, an output of one pixel
SHAPES = [(2, 3, 5, 7, 1), (3, 2, 6, 6, 1), (2, 3, 8, 5, 0), (1, 2, 4, 4, 2), (2, 1, 3, 3, 0),
          (1, 5, 9, 4, 1)]
# (L, padding used, window): the four uses of the two kernels
GATHERS = [("BT", wg.BT, True), ("A", np.ascontiguousarray(wg.AT.T), False)]
SCATTERS = [("AT", wg.AT, False), ("B", np.ascontiguousarray(wg.BT.T), True)]


def _out(h, w, p):
    return h + 2 * p - 2, w + 2 * p - 2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,L,padded", GATHERS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gather_kernel_equals_numpy_twin(shape, name, L, padded, dtype):
    n, c, h, w, p = shape
    rng = np.random.default_rng(0)
    th, tw = wg.tiles(_out(h, w, p))
    if not padded:                      # dy: the output itself, no padding
        h, w, p = min(h, 2 * th), min(w, 2 * tw), 0
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    want = wg.gather_tiles_reference(x, L, (p, p), th, tw)
    got = np.full_like(want, np.nan)
    sums = np.empty(c, dtype)
    wg.gather_tiles(x, L.astype(dtype), p, p, th, tw, got, sums)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(sums, x.sum(axis=(0, 2, 3)), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,L,padded", SCATTERS)
@pytest.mark.parametrize("bias", [True, False])
def test_scatter_kernel_equals_numpy_twin(shape, name, L, padded, bias):
    n, c, h, w, p = shape
    rng = np.random.default_rng(1)
    out = _out(h, w, p)
    th, tw = wg.tiles(out)
    if not padded:                      # y: (Ho, Wo), no padding
        (h, w), p = out, 0
    rows = rng.standard_normal((16, n * th * tw, c))
    b = rng.standard_normal(c) if bias else np.zeros(0)
    want = wg.scatter_tiles_reference(rows, L, (n, c, h, w), (p, p), th, tw, b)
    got = np.full((n, c, h, w), np.nan)
    wg.scatter_tiles(rows, L, p, p, th, tw, b, got)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gather_and_scatter_with_the_same_matrix_are_adjoint():
    """<gather(x), r> = <x, scatter(r)> for B^T / B: the backward pass is the forward's transpose."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 7, 6))
    th, tw = wg.tiles(_out(7, 6, 1))
    r = rng.standard_normal((16, 2 * th * tw, 3))
    lhs = np.sum(wg.gather_tiles_reference(x, wg.BT, (1, 1), th, tw) * r)
    rhs = np.sum(x * wg.scatter_tiles_reference(r, wg.BT.T, x.shape, (1, 1), th, tw, np.zeros(0)))
    assert abs(lhs - rhs) < 1e-12 * max(1.0, abs(lhs))


@pytest.mark.parametrize("shape", SHAPES)
def test_twins_compute_the_direct_convolution(shape):
    """A^T [ (G g G^T) * (B^T d B) ] A summed over channels (Lavin & Gray 2016) = the direct loop."""
    n, c, h, w, p = shape
    rng = np.random.default_rng(3)
    x, W, bias = rng.standard_normal((n, c, h, w)), rng.standard_normal((4, c, 3, 3)), rng.standard_normal(4)
    out = _out(h, w, p)
    th, tw = wg.tiles(out)
    V = wg.gather_tiles_reference(x, wg.BT, (p, p), th, tw)
    M = np.matmul(V, wg.weight_transform(W).transpose(0, 2, 1))
    y = wg.scatter_tiles_reference(M, wg.AT, (n, 4, *out), (0, 0), th, tw, bias)
    np.testing.assert_allclose(y, naive_conv2d(x, W, bias, (1, 1), (p, p)), rtol=1e-12, atol=1e-12)


def test_weight_adjoint_is_the_transpose_of_weight_transform():
    rng = np.random.default_rng(4)
    W, dU = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((16, 3, 2))
    assert abs(np.sum(wg.weight_transform(W) * dU) - np.sum(W * wg.weight_adjoint(dU))) < 1e-12


# (N, C_in, H, W, C_out, padding, bias)
WINO_CASES = [(2, 2, 7, 5, 3, 1, True), (1, 3, 6, 6, 2, 0, False), (2, 2, 5, 4, 3, 2, True)]


@pytest.mark.parametrize("case", WINO_CASES)
def test_winograd_conv2d_gradients_match_finite_differences(case):
    n, cin, h, w, cout, p, bias = case
    rng = np.random.default_rng(5)
    layer = Conv2d(cin, cout, 3, padding=p, bias=bias, algorithm="winograd", rng=rng, dtype=np.float64)
    assert layer.winograd
    errors = check_layer(layer, rng.standard_normal((n, cin, h, w)), rng=6)
    assert set(errors) == {"x", *layer.params}
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("case", WINO_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_winograd_equals_im2col_forward_and_backward(case, dtype):
    n, cin, h, w, cout, p, bias = case
    rng = np.random.default_rng(7)
    wino = Conv2d(cin, cout, 3, padding=p, bias=bias, algorithm="winograd", rng=0, dtype=dtype)
    cols = Conv2d(cin, cout, 3, padding=p, bias=bias, algorithm="im2col", rng=0, dtype=dtype)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    y = cols.forward(x)
    np.testing.assert_allclose(wino.forward(x), y, rtol=tol, atol=tol)
    dy = rng.standard_normal(y.shape).astype(dtype)
    fa = rng.standard_normal(wino.params["W"].shape).astype(dtype)   # feedback alignment's matrix
    for kw in ({}, {"need_dx": False}, {"dx_weight": fa}):
        dx_w, dx_c = wino.backward(dy, **kw), cols.backward(dy, **kw)
        if kw.get("need_dx", True):
            assert dx_w.dtype == dtype
            np.testing.assert_allclose(dx_w, dx_c, rtol=tol, atol=tol)
        else:
            assert dx_w is None
        for k in cols.grads:
            assert wino.grads[k].dtype == dtype
            np.testing.assert_allclose(wino.grads[k], cols.grads[k], rtol=tol, atol=tol * 10)


def test_winograd_in_chunks_equals_one_chunk():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 6, 7))
    whole = Conv2d(3, 4, 3, padding=1, algorithm="winograd", rng=0, dtype=np.float64)
    split = Conv2d(3, 4, 3, padding=1, algorithm="winograd", rng=0, dtype=np.float64)
    split._WINOGRAD_CHUNK_BYTES = 1    # one sample per chunk
    assert len(split._winograd_chunks(5, 3, 4)) == 5 and len(whole._winograd_chunks(5, 3, 4)) == 1
    y = whole.forward(x)
    np.testing.assert_allclose(split.forward(x), y, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(split.backward(dy), whole.backward(dy), rtol=1e-12, atol=1e-12)
    for k in whole.grads:
        np.testing.assert_allclose(split.grads[k], whole.grads[k], rtol=1e-12, atol=1e-12)


def test_auto_picks_winograd_for_3x3_stride_1_with_enough_channels():
    m = Conv2d.WINOGRAD_MIN_CHANNELS
    assert Conv2d(m, m, 3, padding=1).winograd
    assert not Conv2d(m - 1, m, 3, padding=1).winograd          # too few input channels
    assert not Conv2d(m, m - 1, 3, padding=1).winograd          # too few output channels
    assert not Conv2d(m, m, 3, stride=2, padding=1).winograd    # stride 2
    assert not Conv2d(m, m, 1).winograd and not Conv2d(m, m, (3, 1)).winograd
    assert not Conv2d(m, m, 3, algorithm="im2col").winograd
    assert Conv2d(1, 1, 3, algorithm="winograd").winograd


def test_algorithm_is_validated_and_round_trips_through_config():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        Conv2d(8, 8, 3, algorithm="fft")
    with pytest.raises(ValueError, match="needs a 3x3 kernel with stride 1, got kernel \\(3, 3\\) stride \\(2, 2\\)"):
        Conv2d(8, 8, 3, stride=2, algorithm="winograd")
    with pytest.raises(ValueError, match="needs a 3x3 kernel"):
        Conv2d(8, 8, 5, algorithm="winograd")
    # "auto" is what a config without the key means, so configs written before the option are unchanged
    assert "algorithm" not in Conv2d(8, 8, 3).config()
    for alg in ("im2col", "winograd"):
        cfg = Conv2d(8, 8, 3, algorithm=alg).config()
        assert cfg["algorithm"] == alg
        back = layer_from_config(cfg)
        assert back.algorithm == alg and back.winograd == (alg == "winograd")
