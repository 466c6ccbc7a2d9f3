"""Small synthetic tasks: Gaussian clusters, oriented-bar images, permutation reversal.

Everything random takes ``rng`` (a ``np.random.Generator``, an int seed, or None for fresh
entropy); nothing here touches NumPy's global random state.
"""
from __future__ import annotations

import operator

import numpy as np

from .layers.base import as_rng

__all__ = ["permutation_reversal", "synthetic_classification", "synthetic_images", "check_count"]


def check_count(name, value, minimum):
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- synthetic tasks
def permutation_reversal(n, *, length=10, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """Sequence task of the BLL paper (Sec. 4.2): a random permutation of 0..length-1 in,
    the same sequence reversed out.

    Parameters
    ----------
    n : int >= 0, number of sequences
    length : int >= 1, sequence length and vocabulary size (10 in the paper)
    rng : np.random.Generator or int or None

    Returns
    -------
    x : ndarray, shape (n, length), int64; each row a permutation of 0..length-1
    y : ndarray, shape (n, length), int64; ``y = x[:, ::-1]``
    """
    n = check_count("n", n, 0)
    length = check_count("length", length, 1)
    x = as_rng(rng).permuted(np.tile(np.arange(length, dtype=np.int64), (n, 1)), axis=1)
    return x, np.ascontiguousarray(x[:, ::-1])


def synthetic_classification(n, *, n_features=20, n_classes=4, rng=None, separation=3.0,
                             task_seed=0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters: class k is ``N(mu_k, I)`` with ``|mu_k| = separation``.

    The class means depend only on ``task_seed``, ``n_features`` and ``n_classes``, so a
    training and a test set drawn with different ``rng`` are the same task. Random means in
    20 dimensions are nearly orthogonal, so neighbouring clusters sit about
    ``separation * sqrt(2)`` apart; with the defaults the Bayes accuracy is about 95%.

    Parameters
    ----------
    n : int >= 0, number of examples (classes balanced to within one, in random order)
    n_features : int >= 1
    n_classes : int >= 2
    rng : np.random.Generator or int or None; draws the examples
    separation : float >= 0, norm of every class mean, in units of the noise std
    task_seed : int; draws the class means
    dtype : floating dtype of x

    Returns
    -------
    x : ndarray, shape (n, n_features), ``dtype``
    y : ndarray, shape (n,), int64 in 0..n_classes-1
    """
    n = check_count("n", n, 0)
    n_features = check_count("n_features", n_features, 1)
    n_classes = check_count("n_classes", n_classes, 2)
    if not separation >= 0:
        raise ValueError(f"separation must be >= 0, got {separation}")
    mu = np.random.default_rng(task_seed).standard_normal((n_classes, n_features))
    mu *= separation / np.linalg.norm(mu, axis=1, keepdims=True)
    rng = as_rng(rng)
    y = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    x = mu[y] + rng.standard_normal((n, n_features))
    return x.astype(dtype), y


def synthetic_images(n, *, n_classes=4, size=12, rng=None, noise=0.3, dtype=np.float32
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Small images of one bar each; the class is the bar's orientation ``pi * k / n_classes``.

    Each bar passes near the centre, shifted by up to ``size / 6`` pixels in each direction,
    with a random contrast in [0.7, 1.3] and Gaussian pixel noise of std ``noise``, so a
    classifier must detect orientation rather than match fixed pixels: a task for
    convolutions. Bar width is ``size / 12`` pixels (std of the Gaussian profile).

    Parameters
    ----------
    n : int >= 0
    n_classes : int >= 2 (up to about size / 1.5 stays clearly separable)
    size : int >= 4, image height and width
    rng : np.random.Generator or int or None
    noise : float >= 0, std of the additive pixel noise
    dtype : floating dtype of x

    Returns
    -------
    x : ndarray, shape (n, 1, size, size), ``dtype``; roughly in [-1, 2]
    y : ndarray, shape (n,), int64 in 0..n_classes-1
    """
    n = check_count("n", n, 0)
    n_classes = check_count("n_classes", n_classes, 2)
    size = check_count("size", size, 4)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = as_rng(rng)
    y = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    theta = np.pi * y / n_classes
    centre = (size - 1) / 2 + rng.uniform(-size / 6, size / 6, size=(n, 2))
    contrast = rng.uniform(0.7, 1.3, size=n)
    r = np.arange(size, dtype=np.float64)
    dr = r[None, :, None] - centre[:, 0, None, None]  # rows, (n, size, 1)
    dc = r[None, None, :] - centre[:, 1, None, None]  # cols, (n, 1, size)
    # distance from the line through the centre with direction (sin theta, cos theta)
    d = dr * np.cos(theta)[:, None, None] - dc * np.sin(theta)[:, None, None]
    width = size / 12
    x = contrast[:, None, None] * np.exp(-0.5 * (d / width) ** 2)
    x = x + noise * rng.standard_normal(x.shape)
    return x[:, None].astype(dtype), y
