"""Mini-batches and one-hot labels."""
from __future__ import annotations

import numpy as np

from .layers.base import as_rng
from .synthetic import check_count as _check_count

__all__ = ["batches", "one_hot"]


def batches(x, y, batch_size, rng=None, shuffle=True, drop_last=False):
    """Mini-batches ``(xb, yb)`` covering every example once.

    Parameters
    ----------
    x : ndarray, shape (N, ...)
    y : ndarray, shape (N, ...)
    batch_size : int >= 1
    rng : np.random.Generator or int or None
        Source of the shuffling permutation. A Generator advances, so successive calls give
        fresh epochs; an int seed gives the same order on every call; None: fresh entropy.
    shuffle : bool
        False: batches in the given order (views, no copies).
    drop_last : bool
        Skip the final batch when it is shorter than ``batch_size``.

    Returns
    -------
    iterator of (xb, yb) : xb shape (B, ...), yb shape (B, ...), B = batch_size except possibly
        the last. Arguments are checked when ``batches`` is called, not on first ``next``.
    """
    if len(x) != len(y):
        raise ValueError(f"batches: x and y must have the same length, got {len(x)} and {len(y)}")
    batch_size = _check_count("batch_size", batch_size, 1)
    n = len(x)
    order = as_rng(rng).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    return _iterate(x, y, order, batch_size, stop)


def _iterate(x, y, order, batch_size, stop):
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def one_hot(y, n_classes, dtype=np.float32) -> np.ndarray:
    """One-hot encode integer labels.

    Parameters
    ----------
    y : array_like of int, any shape S, values in 0..n_classes-1
    n_classes : int >= 1
    dtype : dtype of the result

    Returns
    -------
    onehot : ndarray, shape S + (n_classes,)
    """
    n_classes = _check_count("n_classes", n_classes, 1)
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"one_hot expects integer labels, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"one_hot: labels must be in 0..{n_classes - 1}, "
                         f"found values in {int(y.min())}..{int(y.max())}")
    out = np.zeros(y.shape + (n_classes,), dtype=dtype)
    np.put_along_axis(out, y[..., None].astype(np.intp), 1, axis=-1)
    return out
