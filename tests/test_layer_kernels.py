"""The layers' Numba kernels (bll_ref/layers/kernels.py) against their NumPy twins."""
import numpy as np
import pytest

from bll_ref.layers import LeakyReLU, ReLU, kernels
from bll_ref.layers.conv import col2im, col2im_reference, im2col, im2col_reference

GEOMETRIES = [  # (N, C, H, W), kernel, stride, padding
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1)),
    ((3, 2, 8, 9), (3, 2), (2, 1), (0, 2)),
    ((1, 4, 5, 5), (5, 5), (1, 1), (2, 2)),
    ((2, 1, 9, 7), (2, 3), (3, 2), (1, 0)),
    ((2, 2, 4, 4), (1, 1), (1, 1), (0, 0)),
    ((1, 2, 3, 3), (3, 3), (2, 2), (3, 3)),  # padding wider than the image
]


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_im2col_kernel_equals_numpy_twin(shape, k, s, p, dtype):
    x = (np.random.default_rng(0).standard_normal(shape) * 100).astype(dtype)
    cols, out = im2col(x, k, s, p)
    ref, out_ref = im2col_reference(x, k, s, p)
    assert out == out_ref and cols.dtype == dtype
    np.testing.assert_array_equal(cols, ref)
    # a strided (non-contiguous) input gives the same columns
    xs = np.repeat(x, 2, axis=3)[..., ::2]
    np.testing.assert_array_equal(im2col(xs, k, s, p)[0], ref)


@pytest.mark.parametrize("shape,k,s,p", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_kernel_equals_numpy_twin_and_is_the_adjoint(shape, k, s, p, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    cols, _ = im2col(x, k, s, p)
    d = rng.standard_normal(cols.shape).astype(dtype)
    dx = col2im(d, shape, k, s, p)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, col2im_reference(d, shape, k, s, p), rtol=tol, atol=tol)
    # adjoint identity <im2col(x), d> = <x, col2im(d)>
    assert np.isclose(np.vdot(cols.astype(np.float64), d), np.vdot(x.astype(np.float64), dx), rtol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_layout_kernels_equal_numpy(dtype):
    rng = np.random.default_rng(2)
    n, o, p = 3, 5, 7
    y2 = rng.standard_normal((o, n * p)).astype(dtype)
    bias = rng.standard_normal(o).astype(dtype)
    out = np.empty((n, o, p), dtype)
    kernels.conv_out_kernel(y2, bias, out)
    np.testing.assert_array_equal(out, y2.reshape(o, n, p).transpose(1, 0, 2) + bias[:, None])
    kernels.conv_out_kernel(y2, np.zeros(0, dtype), out)
    np.testing.assert_array_equal(out, y2.reshape(o, n, p).transpose(1, 0, 2))
    dy = rng.standard_normal((n, o, p)).astype(dtype)
    dy2, db = np.empty((o, n * p), dtype), np.empty(o, dtype)
    kernels.conv_dy_kernel(dy, dy2, db)
    np.testing.assert_array_equal(dy2, dy.transpose(1, 0, 2).reshape(o, -1))
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("layer,slope", [(ReLU(), 0.0), (LeakyReLU(0.1), 0.1), (LeakyReLU(-0.5), -0.5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_kernels_equal_numpy_twins_bit_for_bit(layer, slope, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5)).astype(dtype)
    x[0, 0, :3] = [0.0, -0.0, np.nan]
    x = x.transpose(0, 2, 1)  # non-contiguous input
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, dx = layer.forward(x), layer.backward(dy)
    mask = x > 0
    y_ref = x * mask if slope == 0 else np.where(mask, x, x * dtype(slope))
    dx_ref = dy * mask if slope == 0 else np.where(mask, dy, dy * dtype(slope))
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert np.signbit(y).tolist() == np.signbit(y_ref).tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 9), (2, 1024)])
def test_layer_norm_kernels_equal_numpy_twins(dtype, shape):
    from bll_ref.layers import LayerNorm
    from bll_ref.layers.norm import layer_norm_backward_reference, layer_norm_reference
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ln = LayerNorm(shape[-1], affine=False, dtype=dtype)
    y, dx = ln.forward(x), ln.backward(dy)
    y_ref, inv_std = layer_norm_reference(x, ln.eps)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, layer_norm_backward_reference(dy, y_ref, inv_std), rtol=tol, atol=tol)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_in_chunks_equals_one_chunk(stride, padding):
    """Conv2d runs im2col -> GEMM in chunks of samples; any chunking gives the same result."""
    from bll_ref.layers import Conv2d
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 3, 9, 8))
    whole = Conv2d(3, 4, 3, stride=stride, padding=padding, rng=0, dtype=np.float64)
    split = Conv2d(3, 4, 3, stride=stride, padding=padding, rng=0, dtype=np.float64)
    split._CHUNK_BYTES = 1  # one sample per chunk
    assert len(split._chunks(7, (3, 3))) == 7 and len(whole._chunks(7, (3, 3))) == 1
    y = whole.forward(x)
    np.testing.assert_allclose(split.forward(x), y, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for need_dx in (True, False):
        dx_w, dx_s = whole.backward(dy, need_dx=need_dx), split.backward(dy, need_dx=need_dx)
        if need_dx:
            np.testing.assert_allclose(dx_s, dx_w, rtol=1e-12, atol=1e-12)
        else:
            assert dx_w is None and dx_s is None
        for k in whole.grads:
            np.testing.assert_allclose(split.grads[k], whole.grads[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 6)])
@pytest.mark.parametrize("mode", ["batch", "frozen", "eval"])
def test_batch_norm_kernels_equal_numpy_twins(dtype, shape, mode):
    from bll_ref.layers import BatchNorm
    from bll_ref.layers.norm import batch_norm_backward_reference, batch_norm_reference
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    bn = BatchNorm(shape[1], dtype=dtype)
    bn.params["gamma"][...] = rng.standard_normal(shape[1])
    bn.params["beta"][...] = rng.standard_normal(shape[1])
    bn.buffers["running_mean"][...] = rng.standard_normal(shape[1])
    bn.buffers["running_var"][...] = rng.uniform(0.5, 2, shape[1])
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    if mode == "batch":
        mean, var = x.astype(np.float64).mean(axis=axes), x.astype(np.float64).var(axis=axes)
    else:
        mean, var = bn.buffers["running_mean"].copy(), bn.buffers["running_var"].copy()
    y = bn.forward(x, train=mode != "eval", use_batch_stats=mode == "batch")
    xhat, inv_std, y_ref = batch_norm_reference(x, mean, var, bn.params["gamma"], bn.params["beta"], bn.eps)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    if mode == "eval":
        return
    dy = rng.standard_normal(shape).astype(dtype)
    dx = bn.backward(dy)
    dx_ref, dg, db = batch_norm_backward_reference(dy, xhat, bn.params["gamma"], inv_std, mode == "batch")
    np.testing.assert_allclose(dx, dx_ref, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(bn.grads["gamma"], dg, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.grads["beta"], db, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,s", [((2, 2), (2, 2)), ((3, 3), (2, 2)), ((3, 2), (1, 2))])
def test_max_pool_kernels_equal_numpy_twins(dtype, k, s):
    from bll_ref.layers import MaxPool2d
    from bll_ref.layers.pool import max_pool_backward_reference, max_pool_reference
    rng = np.random.default_rng(7)
    x = np.round(rng.standard_normal((2, 3, 7, 8)), 1).astype(dtype)  # rounding makes ties
    x[0, 0, 0, 1] = np.nan
    pool = MaxPool2d(k, s)
    y = pool.forward(x)
    y_ref, arg_ref = max_pool_reference(x, k, s)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(pool._cache[0], arg_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(pool.backward(dy), max_pool_backward_reference(dy, arg_ref, x.shape, k, s),
                               rtol=1e-6, atol=1e-12)
