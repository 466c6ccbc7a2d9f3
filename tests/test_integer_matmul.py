"""Exact integer GEMM / convolution of the integer reference inference (fixedpoint.records):
matmul_int and conv2d_int go through float32 or float64 BLAS only where every partial sum is
provably an exactly representable integer, and give numpy's int64 result bit for bit."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from bll_ref.fixedpoint import intops as I


def naive_conv_int64(x, W, stride, padding):
    (ph, pw), (sh, sw) = padding, stride
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, W.shape[2:], axis=(2, 3))[:, :, ::sh, ::sw]   # N C Ho Wo kh kw
    return np.einsum("ncijuv,ocuv->noij", win, W.astype(np.int64))


@pytest.mark.parametrize("bound, want", [(0, np.float32), (2 ** 24 - 1, np.float32), (2 ** 24, np.float64),
                                         (2 ** 53 - 1, np.float64), (2 ** 53, None), (2 ** 62 - 1, None)])
def test_exact_float_tiers(bound, want):
    assert I.exact_float(1, bound, 1) is want
    assert I.exact_float(bound, 1, 1) is want


def test_exact_float_refuses_possible_int64_overflow():
    with pytest.raises(ValueError, match="overflow int64"):
        I.exact_float(4, 2 ** 30, 2 ** 30)


def test_matmul_int_is_exact_just_above_the_float32_limit():
    # 4097**2 = 16785409: odd and above 2**24, so float32 cannot hold it; matmul_int must not use it
    a = np.array([[4097, 1], [-4097, 3]], np.int64)
    b = np.array([[4097, 2], [0, -4097]], np.int64)
    want = a @ b
    assert int((a.astype(np.float32) @ b.astype(np.float32))[0, 0]) != int(want[0, 0])   # the tier matters
    got = I.matmul_int(a, b)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lo, hi", [(-128, 128), (0, 256), (-32768, 32768), (-(2 ** 28), 2 ** 28)],
                         ids=["int8", "uint8", "int16", "int29-int64-tier"])
def test_matmul_int_equals_int64_matmul(lo, hi):
    rng = np.random.default_rng(1)
    a = rng.integers(lo, hi, (37, 300))
    b = rng.integers(-128, 128, (300, 19))
    b[0, 0] = -128
    np.testing.assert_array_equal(I.matmul_int(a, b), a @ b)


@pytest.mark.parametrize("stride, padding", [((1, 1), (1, 1)), ((2, 1), (0, 2)), ((1, 2), (2, 0))])
@pytest.mark.parametrize("lo, hi, wlo, whi", [(-128, 128, -128, 128), (0, 256, -128, 128),
                                              (-32768, 32768, -32768, 32768), (-(2 ** 27), 2 ** 27, -64, 64)],
                         ids=["int8-f32", "uint8-f32", "int16-f64", "int64-tier"])
def test_conv2d_int_equals_the_int64_convolution(stride, padding, lo, hi, wlo, whi):
    rng = np.random.default_rng(2)
    x = rng.integers(lo, hi, (3, 4, 9, 8))
    W = rng.integers(wlo, whi, (5, 4, 3, 3))
    x[0, 0, 0, 0], W[0, 0, 0, 0] = lo, wlo          # the extreme codes
    want = naive_conv_int64(x, W, stride, padding)
    got = I.conv2d_int(x, W, stride, padding)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, I.conv2d(x, W, stride, padding, I.matmul_int))


def test_conv2d_int_rejects_a_window_larger_than_the_padded_input():
    with pytest.raises(ValueError, match="larger than the padded input"):
        I.conv2d_int(np.zeros((1, 1, 2, 2), np.int64), np.ones((1, 1, 5, 5), np.int64), (1, 1), (1, 1))
