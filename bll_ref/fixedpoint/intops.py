"""Integer kernels of the layer records: exact int64 matrix products and convolutions (through
float64 BLAS when every partial sum is exactly representable), pooling windows, and their float
twins that the compiler uses for calibration.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..layers.conv import im2col

__all__ = ["exact_float", "matmul_int", "pair", "conv2d", "conv2d_int", "windows", "channel_shape"]


def _absmax(a) -> int:
    return max(int(a.max()), -int(a.min())) if a.size else 0     # no |a| temporary


def exact_float(k, amax, bmax):
    """The float dtype whose BLAS computes a sum of k products of integers ``|a| <= amax``, ``|b| <= bmax``
    exactly: float32 when every partial sum is provably an integer below 2**24, float64 below
    2**53 (in any summation order), else None (use int64).  ValueError if int64 could overflow."""
    bound = k * amax * bmax
    if bound >= 2 ** 62:
        raise ValueError(f"integer matmul: |partial sums| up to {bound} could overflow int64")
    return np.float32 if bound < 2 ** 24 else np.float64 if bound < 2 ** 53 else None


def matmul_int(a, b):
    """Exact int64 a @ b, through float32 / float64 BLAS where :func:`exact_float` proves the float
    result exact (8-bit layers mostly fit float32: twice the float64 rate), else numpy's int64 matmul."""
    dt = exact_float(a.shape[-1], _absmax(a), _absmax(b))
    if dt is None:
        return a @ b
    return (a.astype(dt) @ b.astype(dt)).astype(np.int64)


def pair(v):
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv2d(x, W, stride, padding, matmul):
    """(N, C, H, W) x (O, C, kh, kw) -> (N, O, Ho, Wo) with ``matmul`` (np.matmul or matmul_int)."""
    (kh, kw), (ph, pw) = W.shape[2:], padding
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
        raise ValueError(f"conv/pool window {kh}x{kw} larger than the padded input "
                         f"{(x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)}")
    cols, (ho, wo) = im2col(x, (kh, kw), stride, padding)
    # one row per output pixel, as the float twin has always been computed (same BLAS call)
    y = matmul(np.ascontiguousarray(cols.T), W.reshape(W.shape[0], -1).T)
    return y.reshape(x.shape[0], ho, wo, W.shape[0]).transpose(0, 3, 1, 2)


def conv2d_int(x, W, stride, padding):
    """Exact int64 convolution of integer codes, = ``conv2d(x, W, stride, padding, matmul_int)``:
    im2col straight into the exact float dtype and W (O, K) @ cols (K, N*Ho*Wo), with no
    transposed copy of the column matrix (3x faster on the 8-bit CNN than that path)."""
    dt = exact_float(W[0].size, _absmax(x), _absmax(W))
    if dt is None:
        return conv2d(x, W, stride, padding, matmul_int)
    (kh, kw), (ph, pw) = W.shape[2:], padding
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
        raise ValueError(f"conv/pool window {kh}x{kw} larger than the padded input "
                         f"{(x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)}")
    cols, (ho, wo) = im2col(x.astype(dt), (kh, kw), stride, padding)
    y = W.reshape(W.shape[0], -1).astype(dt) @ cols
    # C order (N, O, Ho, Wo) in the same pass as the cast: the records after it read it that way
    return np.ascontiguousarray(y.reshape(W.shape[0], x.shape[0], ho, wo).transpose(1, 0, 2, 3), dtype=np.int64)


def windows(x, kernel, stride):
    (kh, kw), (sh, sw) = kernel, stride
    if x.ndim != 4 or x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"pooling {kh}x{kw} expects (N, C, H, W) with H >= {kh}, W >= {kw}, got {x.shape}")
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def channel_shape(ndim):
    return (1, -1) + (1,) * (ndim - 2)
