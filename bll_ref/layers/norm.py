"""Normalisation layers: BatchNorm (batch statistics, running buffers) and LayerNorm (last axis)."""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, as_float_dtype, check_array, kernels_for, register

__all__ = ["BatchNorm", "LayerNorm", "layer_norm_reference", "layer_norm_backward_reference",
           "batch_norm_reference", "batch_norm_backward_reference"]


@register
class BatchNorm(Layer):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel (Ioffe & Szegedy 2015).

    Parameters
    ----------
    num_features : int
        C, the channel count.
    eps : float
    momentum : float
        PyTorch convention: ``running = (1 - momentum) * running + momentum * batch``, and
        ``running_var`` tracks the *unbiased* batch variance (the normalisation itself uses the
        biased one), so weights and statistics compare with nn.BatchNorm1d/2d.
    dtype : float32 | float64

    Notes
    -----
    Shapes: x (N, C) or (N, C, H, W) -> y of the same shape; statistics over N (and H, W).
    params gamma (C,) = 1, beta (C,) = 0; buffers running_mean (C,) = 0, running_var (C,) = 1.

    Modes, chosen by ``forward(x, train=True, use_batch_stats=None)``:

    * ``use_batch_stats=None`` (default): batch statistics when ``train``, running ones otherwise.
    * ``train=True`` with batch statistics: updates the running buffers and caches for the full
      batch-statistics backward (dx includes the paths through mean and var).
    * ``train=False``: never caches and never updates buffers; a later ``backward`` raises.
    * ``train=True, use_batch_stats=False``: "frozen" BN. Normalises with the running statistics
      exactly as eval does, leaves the buffers alone, and caches, so ``backward`` gives the
      gradient of the eval-mode map (dx = dy * gamma / sqrt(running_var + eps)). Use it to
      fine-tune with frozen statistics and to gradient-check the eval math.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        if int(num_features) < 1:
            raise ValueError(f"BatchNorm needs num_features >= 1, got {num_features}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"BatchNorm momentum must lie in [0, 1], got {momentum}")
        if not float(eps) > 0.0:
            raise ValueError(f"BatchNorm eps must be > 0, got {eps}")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.dtype = as_float_dtype(dtype)
        C = self.num_features
        self.params["gamma"] = np.ones(C, self.dtype)
        self.params["beta"] = np.zeros(C, self.dtype)
        self.buffers["running_mean"] = np.zeros(C, self.dtype)
        self.buffers["running_var"] = np.ones(C, self.dtype)

    def _check(self, x):
        check_array(x, "BatchNorm", ndim=(2, 4), dtype=self.dtype)
        if x.shape[1] != self.num_features:
            want = "(N, {0}) or (N, {0}, H, W)".format(self.num_features)
            raise ValueError(f"BatchNorm expects shape {want}, got {x.shape}")

    def forward(self, x, train=True, use_batch_stats=None):
        self._check(x)
        batch = train if use_batch_stats is None else bool(use_batch_stats)
        C = self.num_features
        xp, kernels = array_module(x), kernels_for(x)
        x3 = xp.ascontiguousarray(x).reshape(x.shape[0], C, -1)  # (N, C, H*W) or (N, C, 1)
        if batch:
            m = x.size // C
            if m < 2:
                raise ValueError(f"BatchNorm with batch statistics needs more than 1 value per "
                                 f"channel, got input shape {x.shape}; use train=False (running "
                                 "statistics) or a larger batch")
            mean, var = xp.empty(C), xp.empty(C)
            kernels.batch_norm_stats_kernel(x3, mean, var)  # float64, two passes
            if train:
                mom = self.momentum
                rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
                rm *= 1 - mom
                rm += (mom * mean).astype(self.dtype)
                rv *= 1 - mom
                rv += (mom * var * (m / (m - 1))).astype(self.dtype)  # unbiased, as PyTorch
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        # inv_std in the layer's dtype from var + eps in it, as the NumPy twin computes it
        inv_std = 1 / xp.sqrt(var.astype(self.dtype) + self.dtype.type(self.eps))
        xhat, y = xp.empty_like(x3), xp.empty_like(x3)
        kernels.batch_norm_apply_kernel(x3, mean, inv_std, self.params["gamma"], self.params["beta"], xhat, y)
        if train:
            self._cache = (xhat, inv_std, x.shape, batch)
        return y.reshape(x.shape)

    def backward(self, dy):
        xhat, inv_std, shape, batch = self._cached()
        self._check_dy(dy, shape)
        C = self.num_features
        xp, kernels = array_module(xhat), kernels_for(xhat)
        dy3 = xp.ascontiguousarray(dy, dtype=self.dtype).reshape(xhat.shape)
        dx, dgamma, dbeta = xp.empty_like(xhat), xp.empty(C), xp.empty(C)
        kernels.batch_norm_backward_kernel(dy3, xhat, self.params["gamma"], inv_std, batch, dx, dgamma, dbeta)
        self.grads = {"gamma": dgamma.astype(self.dtype), "beta": dbeta.astype(self.dtype)}
        return dx.reshape(shape)

    def hyperparameters(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "dtype": self.dtype.name}


@register
class LayerNorm(Layer):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis (Ba et al. 2016).

    Parameters
    ----------
    num_features : int
        D, the size of the last axis.
    eps : float
    affine : bool
        False: no parameters (y = normalised x). BLL uses LN without affine on block outputs.
    dtype : float32 | float64

    Notes
    -----
    Shapes: x (N, D) or (N, T, D) -> y of the same shape; params gamma (D,) = 1, beta (D,) = 0
    when ``affine``. Same in train and eval (no running statistics).
    """

    def __init__(self, num_features, *, eps=1e-5, affine=True, dtype=np.float32):
        super().__init__()
        if int(num_features) < 1:
            raise ValueError(f"LayerNorm needs num_features >= 1, got {num_features}")
        if not float(eps) > 0.0:
            raise ValueError(f"LayerNorm eps must be > 0, got {eps}")
        self.num_features, self.eps, self.affine = int(num_features), float(eps), bool(affine)
        self.dtype = as_float_dtype(dtype)
        if self.affine:
            self.params["gamma"] = np.ones(self.num_features, self.dtype)
            self.params["beta"] = np.zeros(self.num_features, self.dtype)

    def forward(self, x, train=True):
        check_array(x, "LayerNorm", ndim=(2, 3), tail=(self.num_features,), dtype=self.dtype)
        xp, kernels = array_module(x), kernels_for(x)
        x2 = xp.ascontiguousarray(x).reshape(-1, self.num_features)
        xhat = xp.empty_like(x2)
        inv_std = xp.empty((x2.shape[0], 1), self.dtype)
        # one Numba pass per row (kernels.layer_norm_forward_kernel); NumPy twin: layer_norm_reference
        kernels.layer_norm_forward_kernel(x2, self.eps, xhat, inv_std.reshape(-1))
        xhat = xhat.reshape(x.shape)
        y = xhat * self.params["gamma"] + self.params["beta"] if self.affine else xhat
        if train:
            self._cache = (xhat, inv_std)
        return y

    def backward(self, dy):
        xhat, inv_std = self._cached()
        self._check_dy(dy, xhat.shape)
        if self.affine:
            lead = tuple(range(dy.ndim - 1))
            self.grads = {"gamma": (dy * xhat).sum(axis=lead), "beta": dy.sum(axis=lead)}
            dxhat = dy * self.params["gamma"]
        else:
            self.grads = {}
            dxhat = dy
        D = self.num_features
        xp, kernels = array_module(xhat), kernels_for(xhat)
        dxhat2 = xp.ascontiguousarray(dxhat, dtype=self.dtype).reshape(-1, D)
        dx = xp.empty_like(dxhat2)
        kernels.layer_norm_backward_kernel(dxhat2, xhat.reshape(-1, D), inv_std.reshape(-1), dx)
        return dx.reshape(xhat.shape)

    def hyperparameters(self):
        return {"num_features": self.num_features, "eps": self.eps, "affine": self.affine,
                "dtype": self.dtype.name}


def layer_norm_reference(x, eps):
    """NumPy twin of LayerNorm's kernels: (xhat, inv_std) over the last axis."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    return (x - mean) * inv_std, inv_std


def layer_norm_backward_reference(dxhat, xhat, inv_std):
    """NumPy twin of the LayerNorm input gradient given dL/dxhat."""
    D = xhat.shape[-1]
    s1 = dxhat.sum(axis=-1, keepdims=True)
    s2 = (dxhat * xhat).sum(axis=-1, keepdims=True)
    return (inv_std / D) * (D * dxhat - s1 - xhat * s2)


def batch_norm_reference(x, mean, var, gamma, beta, eps):
    """NumPy twin of BatchNorm's forward kernels given the statistics: (xhat, inv_std, y);
    statistics over axis 0 (and 2, 3 for NCHW): mean = x.mean(axes), var = x.var(axes)."""
    bshape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    inv_std = (1 / np.sqrt(var.astype(x.dtype) + x.dtype.type(eps))).reshape(bshape)
    xhat = (x - mean.astype(x.dtype).reshape(bshape)) * inv_std
    return xhat, inv_std, xhat * gamma.reshape(bshape) + beta.reshape(bshape)


def batch_norm_backward_reference(dy, xhat, gamma, inv_std, batch):
    """NumPy twin of BatchNorm's backward kernel: (dx, dgamma, dbeta)."""
    axes = (0,) if dy.ndim == 2 else (0, 2, 3)
    bshape = (1, -1) if dy.ndim == 2 else (1, -1, 1, 1)
    dgamma, dbeta = (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
    dxhat = dy * gamma.reshape(bshape)
    inv_std = inv_std.reshape(bshape)
    if not batch:  # frozen statistics: a per-channel affine map
        return dxhat * inv_std, dgamma, dbeta
    m = xhat.size // len(gamma)
    s1 = dxhat.sum(axis=axes).reshape(bshape)
    s2 = (dxhat * xhat).sum(axis=axes).reshape(bshape)
    return (inv_std / m) * (m * dxhat - s1 - xhat * s2), dgamma, dbeta
