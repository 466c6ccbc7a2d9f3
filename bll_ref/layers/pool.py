"""Pooling and upsampling on NCHW arrays: MaxPool2d, AvgPool2d, Upsample2d.

Output sizes floor like PyTorch: H_out = (H - kernel) // stride + 1; rows and columns that no
window reaches get a zero gradient.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, check_array, kernels_for, register
from .conv import _out_size, _pair, _plain, _window

__all__ = ["MaxPool2d", "AvgPool2d", "Upsample2d", "max_pool_reference", "max_pool_backward_reference"]


class _Pool2d(Layer):
    """Shared constructor/config of the pooling layers; no parameters, any float dtype."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = _pair(kernel_size, f"{name} kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _pair(stride, f"{name} stride", 1)

    def _check(self, x):
        name = type(self).__name__
        check_array(x, name, ndim=4)
        return _out_size(name, x.shape, self.kernel_size, self.stride)

    def _offsets(self):
        kh, kw = self.kernel_size
        return [(i, j) for i in range(kh) for j in range(kw)]

    def hyperparameters(self):
        return {"kernel_size": _plain(self.kernel_size), "stride": _plain(self.stride)}


@register
class MaxPool2d(_Pool2d):
    """y = max over each kh x kw window (stride defaults to kernel_size); caches the argmax offset.

    Ties go to the first offset in row-major order. Shapes: (N, C, H, W) -> (N, C, H_out, W_out).
    """

    def forward(self, x, train=True):
        out = self._check(x)
        n_off = self.kernel_size[0] * self.kernel_size[1]
        xp = array_module(x)
        y = xp.empty((*x.shape[:2], *out), x.dtype)
        arg = xp.empty(y.shape, np.int8 if n_off < 128 else np.int32)
        # one Numba pass (kernels.max_pool_forward_kernel); NumPy twin: max_pool_reference
        kernels_for(x).max_pool_forward_kernel(xp.ascontiguousarray(x), *self.kernel_size, *self.stride, y, arg)
        if train:
            self._cache = (arg, x.shape)
        return y

    def backward(self, dy):
        arg, shape = self._cached()
        self._check_dy(dy, arg.shape)
        xp = array_module(dy)
        dx = xp.empty(shape, dy.dtype)
        kernels_for(dy).max_pool_backward_kernel(xp.ascontiguousarray(dy), arg, self.kernel_size[1], *self.stride, dx)
        return dx


def max_pool_reference(x, kernel_size, stride):
    """NumPy twin of MaxPool2d's forward kernel: (y, arg), arg the row-major offset of the first
    maximum (strict comparison: ties keep the earlier offset, like PyTorch)."""
    out = _out_size("MaxPool2d", x.shape, kernel_size, stride)
    offsets = [(i, j) for i in range(kernel_size[0]) for j in range(kernel_size[1])]
    y = _window(x, 0, 0, out, stride).copy()
    arg = np.zeros(y.shape, np.int8 if len(offsets) < 128 else np.int32)
    for o, (i, j) in enumerate(offsets[1:], start=1):
        v = _window(x, i, j, out, stride)
        bigger = v > y
        np.maximum(y, v, out=y)
        arg = np.where(bigger, arg.dtype.type(o), arg)
    return y, arg


def max_pool_backward_reference(dy, arg, shape, kernel_size, stride):
    """NumPy twin of MaxPool2d's backward kernel: each dy to its window's argmax."""
    dx = np.zeros(shape, dy.dtype)
    out = arg.shape[2:]
    offsets = [(i, j) for i in range(kernel_size[0]) for j in range(kernel_size[1])]
    for o, (i, j) in enumerate(offsets):
        _window(dx, i, j, out, stride)[...] += np.where(arg == o, dy, dy.dtype.type(0))
    return dx


@register
class AvgPool2d(_Pool2d):
    """y = mean over each kh x kw window (no padding; stride defaults to kernel_size).

    Shapes: (N, C, H, W) -> (N, C, H_out, W_out).
    """

    def forward(self, x, train=True):
        out = self._check(x)
        y = array_module(x).zeros((*x.shape[:2], *out), x.dtype)
        for i, j in self._offsets():
            y += _window(x, i, j, out, self.stride)
        y *= x.dtype.type(1.0 / len(self._offsets()))
        if train:
            self._cache = (x.shape, out)
        return y

    def backward(self, dy):
        shape, out = self._cached()
        self._check_dy(dy, (*shape[:2], *out))
        g = dy * dy.dtype.type(1.0 / len(self._offsets()))
        dx = array_module(dy).zeros(shape, dy.dtype)
        for i, j in self._offsets():
            _window(dx, i, j, out, self.stride)[...] += g
        return dx


@register
class Upsample2d(Layer):
    """Nearest-neighbour upsampling by an integer factor: y[n, c, h, w] = x[n, c, h // s, w // s].

    Shapes: (N, C, H, W) -> (N, C, s*H, s*W); dx sums dy over each s x s block.
    """

    def __init__(self, scale_factor=2):
        super().__init__()
        if not isinstance(scale_factor, (int, np.integer)) or scale_factor < 1:
            raise ValueError(f"Upsample2d scale_factor must be an int >= 1, got {scale_factor!r}")
        self.scale_factor = int(scale_factor)

    def forward(self, x, train=True):
        check_array(x, "Upsample2d", ndim=4)
        n, c, h, w = x.shape
        s = self.scale_factor
        if train:
            self._cache = x.shape
        y = array_module(x).empty((n, c, h, s, w, s), x.dtype)
        y[...] = x[:, :, :, None, :, None]
        return y.reshape(n, c, h * s, w * s)

    def backward(self, dy):
        n, c, h, w = self._cached()
        s = self.scale_factor
        self._check_dy(dy, (n, c, h * s, w * s))
        return dy.reshape(n, c, h, s, w, s).sum(axis=(3, 5))

    def hyperparameters(self):
        return {"scale_factor": self.scale_factor}
