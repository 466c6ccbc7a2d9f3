"""Conv2d on NCHW arrays: im2col + one GEMM per chunk of samples, or Winograd F(2x2, 3x3) for 3x3
stride-1 kernels (pooling and upsampling: ``pool.py``).

Output sizes floor like PyTorch: H_out = (H + 2 * padding - kernel) // stride + 1; rows and
columns that no window reaches get a zero gradient.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..backend import array_module
from . import winograd
from .base import Layer, as_float_dtype, as_rng, check_array, kernels_for, register

__all__ = ["Conv2d", "im2col", "im2col_reference", "col2im", "col2im_reference"]


def _pair(v, name, minimum):
    """int or length-2 sequence -> (int, int), each >= minimum."""
    pair = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(pair) != 2 or not all(isinstance(a, (int, np.integer)) and a >= minimum for a in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return int(pair[0]), int(pair[1])


def _plain(pair):
    """(a, a) -> a, else [a, b]: the JSON form used by hyperparameters()."""
    return pair[0] if pair[0] == pair[1] else list(pair)


def _out_size(who, shape, kernel, stride, padding=(0, 0)):
    """(H_out, W_out) for an (N, C, H, W) input; ValueError when the window does not fit."""
    h, w = shape[2] + 2 * padding[0], shape[3] + 2 * padding[1]
    if h < kernel[0] or w < kernel[1]:
        raise ValueError(f"{who} expects padded spatial size >= {kernel}, got {(h, w)} "
                         f"from input shape {shape}")
    return (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1


def _window(a, i, j, out, stride):
    """The (..., H_out, W_out) view of ``a`` read by kernel offset (i, j)."""
    return a[..., i:i + stride[0] * (out[0] - 1) + 1:stride[0],
             j:j + stride[1] * (out[1] - 1) + 1:stride[1]]


def im2col(x, kernel_size, stride, padding, who="im2col"):
    """(N, C, H, W) -> cols (C*kh*kw, N*H_out*W_out), (H_out, W_out): one row per weight (the
    order of ``W.reshape(out, -1)``), one column per output pixel; zero padding on both sides.
    Also the integer convolution of ``bll_ref.fixedpoint``; ValueError (naming ``who``) when the
    window does not fit the padded input. One Numba pass (``kernels.im2col_kernel``);
    :func:`im2col_reference` is its NumPy twin."""
    out = _out_size(who, x.shape, kernel_size, stride, padding)
    xp = array_module(x)
    cols = xp.empty((x.shape[1] * kernel_size[0] * kernel_size[1], x.shape[0] * out[0] * out[1]), x.dtype)
    kernels_for(x).im2col_kernel(xp.ascontiguousarray(x), *kernel_size, *stride, *padding, *out, cols)
    return cols, out


def im2col_reference(x, kernel_size, stride, padding, who="im2col"):
    """NumPy twin of :func:`im2col` (the specification)."""
    out = _out_size(who, x.shape, kernel_size, stride, padding)
    (ph, pw), (kh, kw) = padding, kernel_size
    if ph or pw:
        n, c, h, w = x.shape
        xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), x.dtype)
        xp[:, :, ph:ph + h, pw:pw + w] = x
    else:
        xp = x
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    # (N, C, Ho, Wo, kh, kw) -> (C, kh, kw, N, Ho, Wo): rows match W.reshape(out, -1)
    return win.transpose(1, 4, 5, 0, 2, 3).reshape(-1, x.shape[0] * out[0] * out[1]), out


def col2im(dcols, shape, kernel_size, stride, padding, out=None):
    """Adjoint of :func:`im2col`: dcols (C*kh*kw, N*Ho*Wo) -> dx (N, C, H, W) of ``shape``
    (written into ``out``, a C-contiguous array of that shape and dtype, when given)."""
    xp = array_module(dcols)
    dx = xp.empty(shape, dcols.dtype) if out is None else out
    out = _out_size("col2im", shape, kernel_size, stride, padding)
    kernels_for(dcols).col2im_kernel(xp.ascontiguousarray(dcols), *kernel_size, *stride, *padding, *out, dx)
    return dx


def col2im_reference(dcols, shape, kernel_size, stride, padding):
    """NumPy twin of :func:`col2im`: one strided slice add per kernel offset into a padded buffer."""
    out = _out_size("col2im", shape, kernel_size, stride, padding)
    n, c, h, w = shape
    (ph, pw), (kh, kw) = padding, kernel_size
    d = dcols.reshape(c, kh, kw, n, *out)
    dxp = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            _window(dxp, i, j, out, stride)[...] += d[:, i, j]
    return np.ascontiguousarray(dxp[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3))


@register
class Conv2d(Layer):
    """y[n, o] = sum_c W[o, c] (*) x[n, c] + c[o]  (cross-correlation, as in PyTorch).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or (int, int)
        Zero padding on both sides.
    bias : bool
    algorithm : "auto" | "im2col" | "winograd"
        How the convolution is computed; all give the same result up to float rounding.
        "im2col": one GEMM over the column matrix (any kernel, stride, padding). "winograd":
        F(2x2, 3x3) (``bll_ref.layers.winograd``), 2.25x fewer multiply-adds; 3x3 kernels with
        stride 1 only. "auto" (the default) takes Winograd wherever it applies and the layer has
        at least ``WINOGRAD_MIN_CHANNELS`` input and output channels, im2col elsewhere.
    rng : Generator | int | None
        W, c ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels * kh * kw (PyTorch's
        nn.Conv2d default).
    dtype : float32 | float64

    Notes
    -----
    Shapes: x (N, in_channels, H, W) -> y (N, out_channels, H_out, W_out);
    params W (out_channels, in_channels, kh, kw), c (out_channels,).
    """

    ALGORITHMS = ("auto", "im2col", "winograd")
    # With few channels Winograd's tile transforms cost more than the GEMM work they save. Fwd + bwd,
    # batch 128, one thread, Winograd / im2col time: 3.7 at 1 -> 32 channels (28x28), 1.5 at 4 -> 8,
    # 1.09 at 8 -> 8, 0.74 at 16 -> 16 (14x14), 0.49-0.78 from 16 channels up
    # (benchmarks/conv_algorithms.py, 2026-11-30).
    WINOGRAD_MIN_CHANNELS = 16

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, bias=True,
                 algorithm="auto", rng=None, dtype=np.float32):
        super().__init__()
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"Conv2d needs positive channel counts, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "Conv2d kernel_size", 1)
        self.stride = _pair(stride, "Conv2d stride", 1)
        self.padding = _pair(padding, "Conv2d padding", 0)
        self.bias, self.dtype = bool(bias), as_float_dtype(dtype)
        fits = self.kernel_size == (3, 3) and self.stride == (1, 1)
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"Conv2d algorithm must be one of {self.ALGORITHMS}, got {algorithm!r}")
        if algorithm == "winograd" and not fits:
            raise ValueError(f"Conv2d algorithm='winograd' needs a 3x3 kernel with stride 1, got kernel "
                             f"{self.kernel_size} stride {self.stride}; use 'im2col' or 'auto'")
        self.algorithm = algorithm
        self.winograd = fits and (algorithm == "winograd" or (
            algorithm == "auto" and min(self.in_channels, self.out_channels) >= self.WINOGRAD_MIN_CHANNELS))
        rng = as_rng(rng)
        kh, kw = self.kernel_size
        bound = 1.0 / np.sqrt(self.in_channels * kh * kw)
        shape = (self.out_channels, self.in_channels, kh, kw)
        self.params["W"] = rng.uniform(-bound, bound, shape).astype(self.dtype)
        if self.bias:
            self.params["c"] = rng.uniform(-bound, bound, self.out_channels).astype(self.dtype)

    # Samples per im2col chunk: the chunk's columns (C*kh*kw rows x B*Ho*Wo) stay within ~1 MB, so
    # im2col -> GEMM -> layout pass (and in backward the GEMMs and col2im) run on data still in
    # the core's L2 instead of streaming one column matrix of the whole batch (29 MB at batch 128,
    # 32 -> 64 channels, 14x14) through memory three times. The GEMMs stay large (N = B*Ho*Wo).
    # Backward rebuilds each chunk's columns from x: measured faster (40 vs 45 ms fwd+bwd at the
    # benchmark shape) than keeping them from forward (9x the input's memory, read back from L3).
    _CHUNK_BYTES = 1 << 20

    #: On a GPU one chunk is the whole batch up to this many column bytes (a large GEMM is what a
    #: GPU wants; there is no core-private cache to stay in).
    _GPU_CHUNK_BYTES = 1 << 30

    def _chunks(self, n, out, device=False):
        per_sample = self.in_channels * self.kernel_size[0] * self.kernel_size[1] * out[0] * out[1]
        limit = self._GPU_CHUNK_BYTES if device else self._CHUNK_BYTES
        b = max(1, limit // (per_sample * self.dtype.itemsize))
        return [(s, min(s + b, n)) for s in range(0, n, b)]

    def _cols(self, x):
        return im2col(x, self.kernel_size, self.stride, self.padding, "Conv2d")

    def forward(self, x, train=True):
        check_array(x, "Conv2d", ndim=4, tail=(self.in_channels, None, None), dtype=self.dtype)
        out = _out_size("Conv2d", x.shape, self.kernel_size, self.stride, self.padding)
        xp = array_module(x)
        bias = self.params["c"] if self.bias else xp.zeros(0, self.dtype)  # length 0: no bias
        # On the GPU every 3x3 layer takes im2col + cuBLAS (the Winograd transforms have no GPU twin)
        winograd_here = self.winograd and xp is np
        y = (self._winograd_forward if winograd_here else self._im2col_forward)(x, out, bias)
        if train:
            self._cache = (x, out)
        return y

    def _im2col_forward(self, x, out, bias):
        W2 = self.params["W"].reshape(self.out_channels, -1)
        xp, kernels = array_module(x), kernels_for(x)
        y = xp.empty((x.shape[0], self.out_channels, out[0] * out[1]), self.dtype)
        for s, e in self._chunks(x.shape[0], out, xp is not np):
            # one GEMM per chunk: (out, C*kh*kw) @ (C*kh*kw, B*Ho*Wo), then NCHW + bias in one pass
            kernels.conv_out_kernel(W2 @ self._cols(x[s:e])[0], bias, y[s:e])
        return y.reshape(x.shape[0], self.out_channels, *out)

    takes_need_dx = True

    def backward(self, dy, need_dx=True, dx_weight=None):
        """``need_dx=False`` skips the input gradient and returns None (a block's first layer under
        BLL); ``dx_weight`` (shape of W) replaces W in the input gradient (feedback alignment)."""
        x, out = self._cached()
        n = x.shape[0]
        self._check_dy(dy, (n, self.out_channels, *out))
        dy = dy.astype(self.dtype, copy=False)  # grads keep the params' dtype
        xp, kernels = array_module(x), kernels_for(x)
        if xp is not np:  # the GPU kernels index flat buffers: a strided dy (a view) is copied once
            dy = xp.ascontiguousarray(dy)
        W = self.params["W"]
        if self.winograd and xp is np:
            return self._winograd_backward(x, out, dy, need_dx, W if dx_weight is None else dx_weight)
        dy = dy.reshape(n, self.out_channels, -1)
        Wdx = (W if dx_weight is None else dx_weight).reshape(self.out_channels, -1)
        dWt = xp.zeros((Wdx.shape[1], self.out_channels), self.dtype)  # dW transposed: see below
        dc = xp.zeros(self.out_channels if self.bias else 0, np.float64)
        dc_chunk = xp.empty_like(dc, dtype=self.dtype)
        dx = xp.empty(x.shape, self.dtype) if need_dx else None
        for s, e in self._chunks(n, out, xp is not np):
            cols = self._cols(x[s:e])[0]
            dy2 = xp.empty((self.out_channels, (e - s) * out[0] * out[1]), self.dtype)  # (out, B*Ho*Wo)
            kernels.conv_dy_kernel(dy[s:e], dy2, dc_chunk)  # GEMM layout + bias sum, one pass
            dc += dc_chunk
            dWt += cols @ dy2.T  # (K, B*P) @ (B*P, out): ~15 % faster in OpenBLAS than dy2 @ cols.T
            if need_dx:
                col2im(Wdx.T @ dy2, x[s:e].shape, self.kernel_size, self.stride, self.padding, out=dx[s:e])
        self.grads = {"W": xp.ascontiguousarray(dWt.T).reshape(W.shape)}
        if self.bias:
            self.grads["c"] = dc.astype(self.dtype)
        return dx

    # Winograd: samples per chunk so that a chunk's tiles (16 x tiles x (in + out channels) floats,
    # V with M in forward, V with dM and dV in backward) stay in the core's L2. At the benchmark
    # shape (32 -> 64 channels, 14x14) that is 4 samples; 2 and 8 measured the same, 16 slower.
    _WINOGRAD_CHUNK_BYTES = 5 << 18

    def _winograd_chunks(self, n, th, tw):
        per_sample = 16 * th * tw * (self.in_channels + self.out_channels) * self.dtype.itemsize
        b = max(1, self._WINOGRAD_CHUNK_BYTES // per_sample)
        return [(s, min(s + b, n)) for s in range(0, n, b)]

    def _input_tiles(self, x, th, tw):
        """V (16, tiles, C) = B^T d B of every input tile of the samples x (a chunk)."""
        V = np.empty((16, x.shape[0] * th * tw, self.in_channels), self.dtype)
        winograd.gather_tiles(x, winograd.BT.astype(self.dtype), *self.padding, th, tw, V,
                              np.zeros(0, self.dtype))
        return V

    def _winograd_forward(self, x, out, bias):
        """y = scatter(A^T, gather(B^T, x) @ U^T) per chunk: see ``bll_ref.layers.winograd``."""
        n = x.shape[0]
        th, tw = winograd.tiles(out)
        # (16, C, O), contiguous: NumPy's stacked matmul ran transposed views far slower here
        Ut = np.ascontiguousarray(winograd.weight_transform(self.params["W"]).transpose(0, 2, 1))
        AT = winograd.AT.astype(self.dtype)
        y = np.empty((n, self.out_channels, *out), self.dtype)
        for s, e in self._winograd_chunks(n, th, tw):
            V = self._input_tiles(x[s:e], th, tw)
            winograd.scatter_tiles(np.matmul(V, Ut), AT, 0, 0, th, tw, bias, y[s:e])
        return y

    def _winograd_backward(self, x, out, dy, need_dx, Wdx):
        """The transpose of _winograd_forward: dM = A dY A^T, dU^T = sum V^T dM, dW = G^T dU G,
        dx = scatter(B, dM U); V is rebuilt from x per chunk (as im2col's columns are)."""
        n = x.shape[0]
        th, tw = winograd.tiles(out)
        U = winograd.weight_transform(Wdx) if need_dx else None                # (16, O, C)
        A, B = (np.ascontiguousarray(m.T, self.dtype) for m in (winograd.AT, winograd.BT))
        dUt = np.zeros((16, self.in_channels, self.out_channels), self.dtype)
        dc = np.zeros(self.out_channels if self.bias else 0, np.float64)
        dc_chunk = np.empty_like(dc, dtype=self.dtype)
        no_sums = np.zeros(0, self.dtype)
        dx = np.empty(x.shape, self.dtype) if need_dx else None
        for s, e in self._winograd_chunks(n, th, tw):
            V = self._input_tiles(x[s:e], th, tw)
            dM = np.empty((16, V.shape[1], self.out_channels), self.dtype)
            winograd.gather_tiles(dy[s:e], A, 0, 0, th, tw, dM, dc_chunk)        # + bias sum
            dc += dc_chunk
            dUt += np.matmul(V.transpose(0, 2, 1), dM)
            if need_dx:
                winograd.scatter_tiles(np.matmul(dM, U), B, *self.padding, th, tw, no_sums, dx[s:e])
        self.grads = {"W": winograd.weight_adjoint(dUt.transpose(0, 2, 1))}
        if self.bias:
            self.grads["c"] = dc.astype(self.dtype)
        return dx

    def hyperparameters(self):
        hp = {"in_channels": self.in_channels, "out_channels": self.out_channels,
              "kernel_size": _plain(self.kernel_size), "stride": _plain(self.stride),
              "padding": _plain(self.padding), "bias": self.bias, "dtype": self.dtype.name}
        if self.algorithm != "auto":  # files written before the option existed mean "auto"
            hp["algorithm"] = self.algorithm
        return hp
