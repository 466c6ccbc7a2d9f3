"""Fully connected layer: y = x W + c."""
from __future__ import annotations

import numpy as np

from .base import Layer, as_float_dtype, as_rng, check_array, register

__all__ = ["Dense"]


@register
class Dense(Layer):
    """y = x @ W + c.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    rng : Generator | int | None
        W, c ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's nn.Linear default, so results compare with
        a PyTorch replication of the papers).
    dtype : float32 | float64

    Notes
    -----
    Shapes: x (N, ..., in_features) -> y (N, ..., out_features) (token-wise on sequences);
    params W (in, out), c (out,).
    """

    def __init__(self, in_features, out_features, *, bias=True, rng=None, dtype=np.float32):
        super().__init__()
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"Dense needs positive sizes, got {in_features} -> {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias, self.dtype = bool(bias), as_float_dtype(dtype)
        rng = as_rng(rng)
        bound = 1.0 / np.sqrt(self.in_features)
        self.params["W"] = rng.uniform(-bound, bound, (self.in_features, self.out_features)).astype(self.dtype)
        if self.bias:
            self.params["c"] = rng.uniform(-bound, bound, self.out_features).astype(self.dtype)

    def forward(self, x, train=True):
        check_array(x, "Dense", ndim=(2, 3, 4), tail=(self.in_features,), dtype=self.dtype)
        y = x @ self.params["W"]
        if self.bias:
            y += self.params["c"]
        if train:
            self._cache = x
        return y

    takes_need_dx = True

    def backward(self, dy, need_dx=True, dx_weight=None):
        """``need_dx=False`` skips the input gradient (a block's first layer under BLL);
        ``dx_weight`` (shape of W) replaces W in dL/dx = dy Wᵀ (feedback alignment)."""
        x = self._cached()
        self._check_dy(dy, x.shape[:-1] + (self.out_features,))
        x2, dy2 = x.reshape(-1, self.in_features), dy.reshape(-1, self.out_features)
        self.grads = {"W": x2.T @ dy2}
        if self.bias:
            self.grads["c"] = dy2.sum(axis=0)
        W = self.params["W"] if dx_weight is None else dx_weight
        return dy @ W.T if need_dx else None

    def hyperparameters(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "dtype": self.dtype.name}
