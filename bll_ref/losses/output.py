"""Output losses: softmax cross-entropy, MSE (and the Gaussian KL of Eq. S15, from ``local``).

Convention as for the local losses: mean over the batch, gradients of that mean.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .local import gaussian_kl_s15  # Eq. S15: the uncertainty autoencoder's output loss

__all__ = ["softmax_cross_entropy", "softmax", "mse", "gaussian_kl_s15"]


def _check_float(x, who, name, *, min_ndim=1):
    """A non-empty float32/float64 ndarray (no int, complex, object or bool), else ValueError."""
    is_array = isinstance(x, np.ndarray) or backend.is_device_array(x)
    if not is_array or x.dtype not in (np.float32, np.float64):
        got = f"{x.shape} {x.dtype}" if is_array else type(x).__name__
        raise ValueError(f"{who} expects {name} as a float32 or float64 array, got {got}")
    if x.ndim < min_ndim or x.size == 0:
        raise ValueError(f"{who} expects a non-empty {name} with at least {min_ndim} dimension(s) "
                         f"(a batch first), got shape {x.shape}")
    return x


def softmax(z, axis=-1):
    """Stable softmax (shift by the max; fine for logits of 1e4)."""
    _check_float(z, "softmax", "z")
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _labels(y, shape, who):
    """Integer labels (N, ...) -> (flat int array); also accepts one-hot / soft targets."""
    y = np.asarray(y)
    n_classes = shape[-1]
    if y.shape == shape and y.dtype in (np.float32, np.float64):
        return None, y.reshape(-1, n_classes)
    if y.shape != shape[:-1] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{who} expects integer labels of shape {shape[:-1]} or targets of shape "
                         f"{shape}, got {y.shape} {y.dtype}")
    y = y.reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{who}: labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    return y, None


def softmax_cross_entropy(logits, y):
    """Mean cross-entropy of softmax(logits) and labels; returns (loss, dlogits).

    logits : (N, C) or (N, T, C) float; y : int labels (N,) / (N, T), or probabilities like logits.
    The loss is the mean over all N (x T) positions; log-sum-exp keeps logits of 1e4 finite.
    """
    _check_float(logits, "softmax_cross_entropy", "logits (N, ..., C)", min_ndim=2)
    if backend.is_device_array(logits):
        return _softmax_cross_entropy_device(logits, y)
    z = logits.reshape(-1, logits.shape[-1])
    labels, target = _labels(y, logits.shape, "softmax_cross_entropy")
    shift = z - z.max(axis=1, keepdims=True)
    with np.errstate(under="ignore"):  # e^-1e4 -> 0 is exact enough; only underflow is silenced
        lse = np.log(np.exp(shift).sum(axis=1, keepdims=True))
        logp = shift - lse
        p = np.exp(logp)
    n = z.shape[0]
    if labels is not None:
        loss = -logp[np.arange(n), labels].mean()
        p[np.arange(n), labels] -= 1
    else:
        loss = -(target * logp).sum(axis=1).mean()
        p -= target
    return float(loss), (p / n).astype(logits.dtype, copy=False).reshape(logits.shape)


def mse(pred, target):
    """Mean squared error over all elements; returns (loss, dpred)."""
    _check_float(pred, "mse", "pred")
    _check_float(target, "mse", "target")
    if pred.shape != target.shape:
        raise ValueError(f"mse: prediction {pred.shape} and target {target.shape} differ")
    d = pred - target
    return float(np.mean(d * d)), (2.0 / d.size) * d


def _softmax_cross_entropy_device(logits, y):
    """GPU ``softmax_cross_entropy``: the same mathematics on CuPy arrays; the loss stays on the
    device (a 0-d float64 array: no host synchronisation per step).

    Host labels are validated as on the CPU and copied over; device labels are taken as they are
    (the caller validated them on the host before the copy)."""
    xp = backend.array_module(logits)
    if backend.is_device_array(y):
        labels, target = (y.reshape(-1), None) if y.shape == logits.shape[:-1] else (None, y)
        if labels is None and y.shape != logits.shape:
            raise ValueError(f"softmax_cross_entropy expects labels of shape {logits.shape[:-1]} or targets "
                             f"of shape {logits.shape}, got {y.shape}")
    else:
        labels, target = _labels(y, logits.shape, "softmax_cross_entropy")
    n_classes = logits.shape[-1]
    if labels is not None and logits.ndim == 2:
        from . import cuda as cuda_losses  # numba.cuda kernels: imported only on the GPU path
        return cuda_losses.softmax_cross_entropy(xp.ascontiguousarray(logits), xp.asarray(labels))
    z = logits.reshape(-1, n_classes)
    shift = z - z.max(axis=1, keepdims=True)
    logp = shift - xp.log(xp.exp(shift).sum(axis=1, keepdims=True))
    p = xp.exp(logp)
    n = z.shape[0]
    if labels is not None:
        labels = xp.asarray(labels)
        rows = xp.arange(n)
        loss = -logp[rows, labels].astype(xp.float64).mean()
        p[rows, labels] -= 1
    else:
        target = xp.asarray(target).reshape(-1, n_classes)
        loss = -(target * logp).sum(axis=1).astype(xp.float64).mean()
        p -= target
    return loss, (p / n).astype(logits.dtype, copy=False).reshape(logits.shape)
