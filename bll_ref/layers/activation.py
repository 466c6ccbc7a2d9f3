"""Element-wise activations and Flatten; no parameters, any float dtype."""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, check_array, kernels_for, register

__all__ = ["ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Flatten", "sigmoid"]


def _leaky_forward(x, slope):
    """(y, mask) of y = x if x > 0 else slope * x, one Numba pass (``kernels``, or its numba.cuda
    twin for a GPU array); any float dtype."""
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    y, mask = xp.empty_like(x), xp.empty(x.shape, np.bool_)
    kernels_for(x).leaky_relu_forward_kernel(x.reshape(-1), x.dtype.type(slope), y.reshape(-1), mask.reshape(-1))
    return y, mask


def _leaky_backward(dy, mask, slope):
    xp = array_module(dy)
    dy = xp.ascontiguousarray(dy)
    dx = xp.empty_like(dy)
    kernels_for(dy).leaky_relu_backward_kernel(dy.reshape(-1), mask.reshape(-1), dy.dtype.type(slope), dx.reshape(-1))
    return dx


@register
class ReLU(Layer):
    """y = max(x, 0); caches the mask."""

    def forward(self, x, train=True):
        check_array(x, "ReLU")
        y, mask = _leaky_forward(x, 0.0)  # NumPy twin: mask = x > 0; y = x * mask
        if train:
            self._cache = mask
        return y

    def backward(self, dy):
        mask = self._cached()
        return _leaky_backward(self._check_dy(dy, mask.shape), mask, 0.0)  # twin: dy * mask


@register
class LeakyReLU(Layer):
    """y = x if x > 0 else slope * x."""

    def __init__(self, slope=0.01):
        super().__init__()
        self.slope = float(slope)

    def forward(self, x, train=True):
        check_array(x, "LeakyReLU")
        # NumPy twin: mask = x > 0; y = np.where(mask, x, x * slope)
        y, mask = _leaky_forward(x, self.slope)
        if train:
            self._cache = mask
        return y

    def backward(self, dy):
        mask = self._cached()
        self._check_dy(dy, mask.shape)
        return _leaky_backward(dy, mask, self.slope)  # twin: np.where(mask, dy, dy * slope)

    def hyperparameters(self):
        return {"slope": self.slope}


def sigmoid(x):
    """Overflow-free logistic function S(x) = 1 / (1 + e^-x) (Eq. 9's S)."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


@register
class Sigmoid(Layer):
    """y = S(x); caches the output (S' = y (1 - y))."""

    def forward(self, x, train=True):
        check_array(x, "Sigmoid")
        y = sigmoid(x)
        if train:
            self._cache = y
        return y

    def backward(self, dy):
        y = self._cached()
        return self._check_dy(dy, y.shape) * y * (1 - y)


@register
class Tanh(Layer):
    """y = tanh(x); caches the output (tanh' = 1 - y^2)."""

    def forward(self, x, train=True):
        check_array(x, "Tanh")
        y = array_module(x).tanh(x)
        if train:
            self._cache = y
        return y

    def backward(self, dy):
        y = self._cached()
        return self._check_dy(dy, y.shape) * (1 - y * y)


@register
class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...)."""

    def forward(self, x, train=True):
        check_array(x, "Flatten", floating=False)
        if train:
            self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape = self._cached()
        self._check_dy(dy, (shape[0], int(np.prod(shape[1:]))))
        return dy.reshape(shape)
