"""Element-wise activations and Flatten; no parameters, any float dtype."""
from __future__ import annotations

import numpy as np

from .base import Layer, check_array, register


@register
class ReLU(Layer):
    """y = max(x, 0); caches the mask."""

    def forward(self, x, train=True):
        check_array(x, "ReLU")
        mask = x > 0
        if train:
            self._cache = mask
        return x * mask

    def backward(self, dy):
        mask = self._cached()
        return self._check_dy(dy, mask.shape) * mask


@register
class LeakyReLU(Layer):
    """y = x if x > 0 else slope * x."""

    def __init__(self, slope=0.01):
        super().__init__()
        self.slope = float(slope)

    def forward(self, x, train=True):
        check_array(x, "LeakyReLU")
        mask = x > 0
        if train:
            self._cache = mask
        return np.where(mask, x, x * x.dtype.type(self.slope))

    def backward(self, dy):
        mask = self._cached()
        self._check_dy(dy, mask.shape)
        return np.where(mask, dy, dy * dy.dtype.type(self.slope))

    def hyperparameters(self):
        return {"slope": self.slope}


def sigmoid(x):
    """Overflow-free logistic function S(x) = 1 / (1 + e^-x) (Eq. 9's S)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


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
        y = np.tanh(x)
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
