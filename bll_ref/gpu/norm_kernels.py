"""numba.cuda twins of the LeakyReLU, LayerNorm and BatchNorm kernels of
``bll_ref.layers.kernels``. :mod:`bll_ref.gpu.layer_kernels` is the public face (the layers
call it) and explains how the kernels map onto the GPU and how exact they are; the launch
settings and machinery are :mod:`bll_ref.gpu.conv_kernels`' (``REDUCE_THREADS`` here only sizes
the shared-memory buffers).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, from_dtype, types

from .conv_kernels import REDUCE_THREADS, _block_sum, _Kernels
from .launch import like

__all__ = ["leaky_relu_forward_kernel", "leaky_relu_backward_kernel",
           "layer_norm_forward_kernel", "layer_norm_backward_kernel",
           "batch_norm_stats_kernel", "batch_norm_apply_kernel", "batch_norm_backward_kernel",
           "PTX_SIGNATURES"]


@cuda.jit(device=True, inline="always")
def _block_sum2(buf, buf2, v, v2):
    """Two block sums in one tree (half the barriers of two ``_block_sum`` calls)."""
    t = cuda.threadIdx.x
    buf[t] = v
    buf2[t] = v2
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
            buf2[t] += buf2[t + s]
        cuda.syncthreads()
        s //= 2
    total, total2 = buf[0], buf2[0]
    cuda.syncthreads()
    return total, total2


# ---------------------------------------------------------------------------------------------
# LeakyReLU (the mask: bool arrays, as bytes)

@cuda.jit
def _leaky_forward(x, slope, y, mask, n):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        v = x[i]
        pos = v > 0
        mask[i] = 1 if pos else 0
        y[i] = v if pos else v * slope


def leaky_relu_forward_kernel(x, slope, y, mask):
    """y = x if x > 0 else slope * x; mask = x > 0 (flat arrays; slope = 0 is ReLU; slope in
    x's dtype, as the layers pass it)."""
    if x.size:
        _K.elementwise("_leaky_forward", "leaky_relu_forward_kernel", ("x", "y", "mask"), (x, y, mask),
                x.size, lambda xp, yp, mp: (xp, slope, yp, mp, x.size))


@cuda.jit
def _leaky_backward(dy, mask, slope, dx, n):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        v = dy[i]
        dx[i] = v if mask[i] != 0 else v * slope


def leaky_relu_backward_kernel(dy, mask, slope, dx):
    """dx = dy where mask else slope * dy (flat arrays)."""
    if dy.size:
        _K.elementwise("_leaky_backward", "leaky_relu_backward_kernel", ("dy", "mask", "dx"), (dy, mask, dx),
                dy.size, lambda gp, mp, xp: (gp, mp, slope, xp, dy.size))


# ---------------------------------------------------------------------------------------------
# LayerNorm: one block per row

@cuda.jit
def _layer_norm_forward(x, D, eps, xhat, inv_std):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    r, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    row = r * D
    s = np.float64(0.0)
    for d in range(t, D, T):
        s += x[row + d]
    mean = _block_sum(buf, s) / D
    q = np.float64(0.0)
    for d in range(t, D, T):
        c = x[row + d] - mean
        q += c * c
    inv = 1.0 / math.sqrt(_block_sum(buf, q) / D + eps)
    if t == 0:
        inv_std[r] = inv
    mu, iv = like(x, mean), like(x, inv)
    for d in range(t, D, T):
        xhat[row + d] = (x[row + d] - mu) * iv


def layer_norm_forward_kernel(x, eps, xhat, inv_std):
    """Rows of x (M, D): xhat = (x - mean) / sqrt(var + eps), inv_std (M,) = 1 / sqrt(var + eps).

    Two passes over each row (mean, then centred second moment, as ``np.var``), sums in float64."""
    M, D = x.shape
    if M:
        _K.per_block("_layer_norm_forward", "layer_norm_forward_kernel", ("x", "xhat", "inv_std"), (x, xhat, inv_std),
                M, lambda xp, hp, ip: (xp, D, eps, hp, ip))


@cuda.jit
def _layer_norm_backward(dxhat, xhat, inv_std, D, dx):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    buf2 = cuda.shared.array(REDUCE_THREADS, np.float64)
    r, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    row = r * D
    s1 = np.float64(0.0)
    s2 = np.float64(0.0)
    for d in range(t, D, T):
        g = dxhat[row + d]
        s1 += g
        s2 += g * xhat[row + d]  # the product in the array dtype, as the CPU kernel
    s1, s2 = _block_sum2(buf, buf2, s1, s2)
    k = like(dxhat, np.float64(inv_std[r]) / D)
    a, b, n = like(dxhat, s1), like(dxhat, s2), like(dxhat, D)
    for d in range(t, D, T):
        dx[row + d] = k * (n * dxhat[row + d] - a - xhat[row + d] * b)


def layer_norm_backward_kernel(dxhat, xhat, inv_std, dx):
    """dx = inv_std / D * (D dxhat - sum(dxhat) - xhat * sum(dxhat * xhat)) per row (M, D)."""
    M, D = dxhat.shape
    if M:
        _K.per_block("_layer_norm_backward", "layer_norm_backward_kernel", ("dxhat", "xhat", "inv_std", "dx"),
                (dxhat, xhat, inv_std, dx), M, lambda gp, hp, ip, xp: (gp, hp, ip, D, xp))


# ---------------------------------------------------------------------------------------------
# BatchNorm on (N, C, P): statistics and parameter gradients one block per channel, the rest
# elementwise (channel of flat element k: (k // P) % C)

@cuda.jit
def _batch_norm_stats(x, N, C, P, mean, var):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    m = N * P
    c, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s = np.float64(0.0)
    for k in range(t, m, T):
        s += x[((k // P) * C + c) * P + k % P]
    mu = _block_sum(buf, s) / m
    q = np.float64(0.0)
    for k in range(t, m, T):
        d = x[((k // P) * C + c) * P + k % P] - mu
        q += d * d
    q = _block_sum(buf, q)
    if t == 0:
        mean[c] = mu
        var[c] = q / m


def batch_norm_stats_kernel(x, mean, var):
    """x (N, C, P) -> per-channel mean and biased variance (float64; two passes, as ``np.var``)."""
    N, C, P = x.shape
    if C:
        _K.per_block("_batch_norm_stats", "batch_norm_stats_kernel", ("x", "mean", "var"), (x, mean, var),
                C, lambda xp, mp, vp: (xp, N, C, P, mp, vp))


@cuda.jit
def _batch_norm_apply(x, mean, inv_std, gamma, beta, N, C, P, xhat, y):
    for k in range(cuda.grid(1), N * C * P, cuda.gridsize(1)):
        c = (k // P) % C
        h = (x[k] - like(x, mean[c])) * like(x, inv_std[c])
        xhat[k] = h
        y[k] = h * gamma[c] + beta[c]


def batch_norm_apply_kernel(x, mean, inv_std, gamma, beta, xhat, y):
    """xhat = (x - mean[c]) * inv_std[c]; y = gamma[c] * xhat + beta[c]  (x, xhat, y: (N, C, P)).

    mean: float64 (batch statistics) or x's dtype (running ones); the rest in x's dtype."""
    if x.size:
        N, C, P = x.shape
        _K.elementwise("_batch_norm_apply", "batch_norm_apply_kernel",
                ("x", "mean", "inv_std", "gamma", "beta", "xhat", "y"), (x, mean, inv_std, gamma, beta, xhat, y),
                x.size,
                lambda xp, mp, ip, gp, bp, hp, yp: (xp, mp, ip, gp, bp, N, C, P, hp, yp))


@cuda.jit
def _batch_norm_backward_sums(dy, xhat, N, C, P, dgamma, dbeta):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    buf2 = cuda.shared.array(REDUCE_THREADS, np.float64)
    c, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s1 = np.float64(0.0)
    s2 = np.float64(0.0)
    for k in range(t, N * P, T):
        i = ((k // P) * C + c) * P + k % P
        g = dy[i]
        s1 += g
        s2 += g * xhat[i]  # the product in the array dtype, as the CPU kernel
    s1, s2 = _block_sum2(buf, buf2, s1, s2)
    if t == 0:
        dgamma[c] = s2
        dbeta[c] = s1


@cuda.jit
def _batch_norm_backward_dx(dy, xhat, gamma, inv_std, batch, dgamma, dbeta, N, C, P, dx):
    m = N * P
    for k in range(cuda.grid(1), N * C * P, cuda.gridsize(1)):
        c = (k // P) % C
        gi = gamma[c] * inv_std[c]
        if batch != 0:
            km, a, b = like(dy, np.float64(gi) / m), like(dy, dbeta[c]), like(dy, dgamma[c])
            dx[k] = km * (like(dy, m) * dy[k] - a - xhat[k] * b)
        else:
            dx[k] = gi * dy[k]


def batch_norm_backward_kernel(dy, xhat, gamma, inv_std, batch, dx, dgamma, dbeta):
    """dgamma = sum dy xhat, dbeta = sum dy per channel (float64 sums); with batch statistics
    dx = gamma inv_std / m (m dy - dbeta - xhat dgamma), else (frozen) dx = gamma inv_std dy.

    Two launches: the sums (one block per channel, into float64 dgamma / dbeta), then dx
    (elementwise; it reads dgamma and dbeta back)."""
    N, C, P = dy.shape
    if C:
        _K.per_block("_batch_norm_backward_sums", "batch_norm_backward_kernel", ("dy", "xhat", "dgamma", "dbeta"),
                (dy, xhat, dgamma, dbeta), C, lambda gp, hp, ap, bp: (gp, hp, N, C, P, ap, bp))
    if dy.size:
        _K.elementwise("_batch_norm_backward_dx", "batch_norm_backward_kernel",
                ("dy", "xhat", "gamma", "inv_std", "dgamma", "dbeta", "dx"),
                (dy, xhat, gamma, inv_std, dgamma, dbeta, dx), dy.size,
                lambda gp, hp, cp, ip, ap, bp, xp: (gp, hp, cp, ip, 1 if batch else 0, ap, bp, N, C, P, xp))


# ---------------------------------------------------------------------------------------------
# signatures: per kernel, per combination of array dtypes the layers pass (float32 first, then
# float64). The PTX test compiles every kernel with each and checks that every kernel is listed.

def _fill(add):
    i64, f64 = types.int64, types.float64
    b, d64 = np.dtype(np.bool_), np.dtype(np.float64)
    for dt in (np.dtype(np.float32), d64):
        f = from_dtype(dt)
        add("_leaky_forward", dt, f, dt, b, i64)
        add("_leaky_backward", dt, b, f, dt, i64)
        add("_layer_norm_forward", dt, i64, f64, dt, dt)
        add("_layer_norm_backward", dt, dt, dt, i64, dt)
        add("_batch_norm_stats", dt, i64, i64, i64, d64, d64)
        for mean in (d64, dt):  # batch statistics arrive in float64, running ones in the layer dtype
            add("_batch_norm_apply", dt, mean, dt, dt, dt, i64, i64, i64, dt, dt)
        add("_batch_norm_backward_sums", dt, dt, i64, i64, i64, d64, d64)
        add("_batch_norm_backward_dx", dt, dt, dt, dt, i64, d64, d64, i64, i64, i64, dt)


_K = _Kernels(globals(), _fill)
#: {kernel name: {key: argument types}} for ``numba.cuda.compile_ptx`` and the launchers.
PTX_SIGNATURES = _K.signatures
