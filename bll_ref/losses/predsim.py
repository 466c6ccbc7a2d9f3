"""Similarity-matching local loss of Pred-Sim (Nøkland & Eidnes 2019, "Training neural networks
with local error signals"), the comparison row of paper 003.

Pred-Sim trains every hidden block with

    L = (1 - beta) * CE(head(h), y)  +  beta * || S(pool(h)) - S(Y) ||^2 / N^2,   beta = 0.99

where S(X) is the adjusted cosine similarity (correlation) matrix of the mini-batch rows,

    x~_i = (x_i - mean(x_i)) / (eps + ||x_i - mean(x_i)||),   S(X) = X~ X~^T     (N, N),

Y the one-hot labels, and pool(h) the standard deviation of every channel over its spatial
positions for image features (N, C, H, W) with C > 3 and H W > 1 (N&E's default "std pooling";
the unbiased std, as torch.std), h flattened otherwise. The predictive half is BLL's local head
(``bll_ref.methods.learner``); this module is the similarity half. Divergence from N&E, said
out loud: their similarity term first passes h through a learned 3x3 conv (``conv_loss``); here S
sees the block output itself, so the term trains only the block. The torch code clamps S to
[-1, 1]; by Cauchy-Schwarz with eps > 0 no entry reaches the clamp, so it is left out.

Convention as in ``local.py``: arrays in, (loss, gradient) out; the gradient is the exact gradient
of the returned loss (a test checks it by central finite differences in float64). Plain array
code on either device (the array module follows h); on the GPU the loss stays a device scalar.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module

__all__ = ["similarity_matrix", "similarity_backward", "std_pool", "std_pool_backward",
           "sim_features", "sim_loss", "EPS", "STD_EPS"]

EPS = 1e-8      # N&E: xc / (1e-8 + ||xc||)
STD_EPS = 1e-8  # inside the std's square root, so a dead (constant) channel has a finite gradient


def similarity_matrix(x):
    """(S, cache): adjusted cosine similarity of the rows of x (N, F); S is (N, N)."""
    xp = array_module(x)
    xc = x - x.mean(axis=1, keepdims=True)
    r = xp.sqrt(xp.sum(xc * xc, axis=1, keepdims=True))
    n = r + x.dtype.type(EPS)
    xn = xc / n
    return xn @ xn.T, (xc, r, n, xn)


def similarity_backward(dS, cache):
    """dL/dx (N, F) from dL/dS (N, N) through ``similarity_matrix``."""
    xc, r, n, xn = cache
    xp = array_module(dS)
    dxn = (dS + dS.T) @ xn
    # xn = xc / n with n = eps + ||xc||: d n / d xc = xc / ||xc|| (0 for an all-constant row)
    r_safe = xp.where(r > 0, r, 1)
    dxc = dxn / n - xc * (xp.sum(dxn * xc, axis=1, keepdims=True) / (n * n * r_safe))
    return dxc - dxc.mean(axis=1, keepdims=True)


def std_pool(h):
    """(s, cache): unbiased standard deviation of every channel of h (N, C, H, W) over H W -> (N, C),
    s = sqrt(var + STD_EPS)."""
    z = h.reshape(h.shape[0], h.shape[1], -1)
    m = z.shape[2]
    xp = array_module(h)
    zc = z - z.mean(axis=2, keepdims=True)
    s = xp.sqrt(xp.sum(zc * zc, axis=2) / (m - 1) + h.dtype.type(STD_EPS))
    return s, (zc, s, h.shape)


def std_pool_backward(ds, cache):
    """dL/dh (N, C, H, W) from dL/ds (N, C) through ``std_pool``."""
    zc, s, shape = cache
    m = zc.shape[2]
    # d s / d z_j = (z_j - mean) / ((m - 1) s); the mean's own term sums to zero
    return (zc * (ds / ((m - 1) * s))[:, :, None]).reshape(shape)


def _uses_std_pool(h):
    return h.ndim == 4 and h.shape[1] > 3 and h.shape[2] * h.shape[3] > 1


def sim_features(h):
    """(features (N, F), cache): N&E's input to S: std-pooled image features, else h flattened."""
    if _uses_std_pool(h):
        return std_pool(h)
    return h.reshape(len(h), -1), None


def sim_loss(h, Y):
    """(loss, dL/dh): the similarity-matching loss mean((S(pool(h)) - S(Y))^2) over the N x N
    entries and its gradient. h : (N, ...) block output; Y : (N, n_classes) one-hot labels."""
    if len(h) != len(Y):
        raise ValueError(f"sim_loss: {len(h)} feature rows but {len(Y)} label rows")
    if len(h) < 2:
        raise ValueError("sim_loss needs at least 2 examples in the batch (a similarity matrix)")
    xp = array_module(h)
    feats, pool_cache = sim_features(h)
    S_h, cache = similarity_matrix(feats)
    S_y, _ = similarity_matrix(xp.asarray(Y, dtype=h.dtype))
    diff = S_h - S_y
    nn = diff.size
    loss = xp.sum(diff * diff) / nn
    loss = float(loss) if xp is np else loss  # no wait for the GPU in a training step
    d_feats = similarity_backward(diff * h.dtype.type(2.0 / nn), cache)
    dh = std_pool_backward(d_feats, pool_cache) if pool_cache is not None else d_feats.reshape(h.shape)
    return loss, dh.astype(h.dtype, copy=False)
