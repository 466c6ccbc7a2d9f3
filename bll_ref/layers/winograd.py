"""Winograd F(2x2, 3x3) convolution for Conv2d's 3x3, stride-1 layers (Lavin & Gray 2016, "Fast
Algorithms for Convolutional Neural Networks", Sec. 4).

Each 2x2 output tile of one channel pair is

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* element-wise, 4x4)

with g the 3x3 kernel and d the 4x4 input tile that covers it (tiles step by 2, so neighbouring
input tiles overlap by 2). Summed over input channels, the 16 element-wise products become 16
independent GEMMs, V[k] (T, C) @ U[k]^T (C, O) over the T tiles of a chunk of samples: 16 O C
multiply-adds per tile instead of 36 O C for im2col (2.25x fewer), and V is 16/4 = 4x the input
instead of im2col's 9x.

The backward pass is the exact transpose of that linear map, so finite differences check it in
float64 like any other layer: dM = A dY A^T per tile, dU^T = sum over tiles V^T dM, dW = G^T dU G,
and dV = dM U, scattered back as B dV B^T onto the overlapping windows of dx. In exact arithmetic
this is the same convolution as im2col's; in float32 the transforms add a few ulps of rounding
(the entries of B, G and A are 0, +-1 and +-1/2, exact in binary).

Layouts: x (N, C, H, W); tiles (16, T, C) with row k = 4 i + j for tile element (i, j) and tile
t = (n * th + ty) * tw + tx, channels last so that the kernels' inner loops run over contiguous
channels. Tiles cover the output (Ho, Wo) rounded up to even sizes: reads past the padded input
are zeros, writes past (Ho, Wo) are dropped.

Both data transforms are one kernel pair: ``gather_tiles`` (x -> V with L = B^T, and dy -> dM with
L = A) and ``scatter_tiles`` (M -> y with L = A^T, dV -> dx with L = B). Each has a NumPy twin
(``*_reference``, the specification); tests assert they agree. Kernels are pure (arrays in,
preallocated out) and serial, like ``kernels.py``; flat views with unsigned offsets, so Numba emits
no negative-index branch and the channel loops vectorise.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["tiles", "weight_transform", "weight_adjoint", "gather_tiles", "scatter_tiles",
           "gather_tiles_reference", "scatter_tiles_reference", "BT", "G", "AT"]

# error_model="numpy": no ZeroDivisionError branches, so loops vectorise. The channel sums (the bias
# gradient) may reassociate; they accumulate in float64.
_jit = dict(cache=True, nogil=True, error_model="numpy")
_jit_sums = dict(_jit, fastmath={"reassoc"})

# Lavin & Gray 2016, F(2x2, 3x3): input transform B^T, kernel transform G, output transform A^T
#: Input transform B^T (4, 4) of F(2x2, 3x3): a 4x4 input tile d becomes B^T d B.
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
#: Kernel transform G (4, 3): a 3x3 kernel g becomes G g G^T.
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
#: Output transform A^T (2, 4): the elementwise product m gives the 2x2 output A^T m A.
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def tiles(out):
    """(th, tw): the 2x2 output tiles covering an (Ho, Wo) output."""
    return (out[0] + 1) // 2, (out[1] + 1) // 2


def weight_transform(W):
    """W (O, C, 3, 3) -> U (16, O, C), U[4i+j] = (G W G^T)[i, j]. Two tensordots (one GEMM each
    with K = 3), not a stacked matmul of O*C tiny products (much slower at 64 x 64 channels)."""
    g = G.astype(W.dtype)
    wg = np.tensordot(W, g, axes=([3], [1]))                   # (O, C, 3, 4): W G^T
    u = np.tensordot(g, wg, axes=([1], [2]))                   # (4, O, C, 4): G W G^T
    return np.ascontiguousarray(u.transpose(0, 3, 1, 2).reshape(16, *W.shape[:2]))


def weight_adjoint(dU):
    """dU (16, O, C) -> dW (O, C, 3, 3) = G^T dU G per channel pair: the adjoint of weight_transform."""
    g = G.astype(dU.dtype)
    du = dU.reshape(4, 4, *dU.shape[1:])                      # (i, j, O, C)
    t = np.tensordot(g, du, axes=([0], [0]))                   # (3, 4, O, C): G^T dU
    dw = np.tensordot(t, g, axes=([1], [0]))                   # (3, O, C, 3): G^T dU G
    return np.ascontiguousarray(dw.transpose(1, 2, 0, 3))


# ------------------------------------------------------------------------------------------------
# NumPy twins: the specification of the two kernels
# ------------------------------------------------------------------------------------------------
def gather_tiles_reference(x, L, padding, th, tw):
    """x (N, C, H, W) -> (16, N*th*tw, C): out[4i+j, t] = sum_rs L[i, r] L[j, s] xp[n, :, 2ty+r, 2tx+s]
    over the m x m window (m = L.shape[1]) of tile t in x zero-padded by ``padding`` on the top and
    left and by zeros to the tiles' extent on the bottom and right."""
    n, c, h, w = x.shape
    m = L.shape[1]
    xp = np.zeros((n, c, 2 * th + m - 2, 2 * tw + m - 2), x.dtype)
    xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x
    d = sliding_window_view(xp, (m, m), axis=(2, 3))[:, :, ::2, ::2]       # (N, C, th, tw, m, m)
    L = L.astype(x.dtype)
    out = np.einsum("ir,ncyxrs,js->ijnyxc", L, d, L)
    return np.ascontiguousarray(out.reshape(16, -1, c))


def scatter_tiles_reference(rows, L, shape, padding, th, tw, bias):
    """(16, N*th*tw, C) -> (N, C, H, W) of ``shape``: plane[n, :, 2ty+a, 2tx+b] += sum_ij L[a, i]
    L[b, j] rows[4i+j, t] over each tile's m x m window (m = L.shape[0]; windows may overlap),
    then out = plane[:, :, ph:ph+H, pw:pw+W] + bias (length C, or 0 for none)."""
    n, c, h, w = shape
    m = L.shape[0]
    L = L.astype(rows.dtype)
    win = np.einsum("ai,ijnyxc,bj->ncyxab", L, rows.reshape(4, 4, n, th, tw, c), L)
    plane = np.zeros((n, c, 2 * th + m - 2, 2 * tw + m - 2), rows.dtype)
    for a in range(m):
        for b in range(m):
            plane[:, :, a:a + 2 * th:2, b:b + 2 * tw:2] += win[..., a, b]
    out = plane[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]
    if bias.size:
        out = out + bias.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------------------------------------
# Numba kernels: one sample at a time through a channels-last plane that stays in L1/L2. The plane
# stores even and odd columns apart, (rows, 2, cols / 2, C): window column s of tile tx is then
# column (tx + s // 2) of half s % 2, so for a fixed tile row and window element the tw tiles' C
# channels are one contiguous run of tw * C values in the plane as in the tiles, and the inner loop
# runs over all of them (tw * C, not just C).
# ------------------------------------------------------------------------------------------------
@njit(inline="always", **_jit)
def _at(row, col, half_width, C):
    """Flat offset of (row, col, channel 0) in a plane stored (rows, 2, half_width, C); row, col >= 0."""
    return np.uint64(((row * 2 + (col & 1)) * half_width + (col >> 1)) * C)


@njit(**_jit_sums)
def gather_tiles(x, L, ph, pw, th, tw, out, sums):
    """Kernel of :func:`gather_tiles_reference`; ``out`` (16, N*th*tw, C) preallocated. ``sums``
    (length C, or 0 for none) gets the sum of x over n, h, w per channel (the bias gradient when x
    is dy), accumulated in float64."""
    N, C, H, W = x.shape
    m = L.shape[1]
    Hp, Wh, T = 2 * th + m - 2, tw + m // 2 - 1, out.shape[1]
    plane = np.zeros(Hp * 2 * Wh * C, x.dtype)                # borders stay zero
    of = out.reshape(-1)
    want_sums = sums.size > 0
    acc = np.zeros(C if want_sums else 0, np.float64)
    # each row of L has at most two nonzeros (B^T and A do): their columns and coefficients; a row
    # with one pairs it with coefficient 0 on the same element (exact for finite input)
    idx = np.zeros((4, 2), np.int64)
    coef = np.zeros((4, 2), x.dtype)
    for i in range(4):
        k = 0
        for r in range(m):
            if L[i, r] != 0:
                idx[i, k], coef[i, k] = r, L[i, r]
                k += 1
        if k == 1:
            idx[i, 1] = idx[i, 0]
    run = tw * C
    for n in range(N):
        # pixel by pixel, channels innermost: strided reads, contiguous writes (3-4x faster than
        # the other order, whose writes stride by C)
        for h in range(H):
            for w in range(W):
                dst = _at(h + ph, w + pw, Wh, C)
                for c in range(C):
                    plane[dst + np.uint64(c)] = x[n, c, h, w]
                if want_sums:
                    for c in range(C):
                        acc[c] += x[n, c, h, w]
        for ty in range(th):
            t0 = (n * th + ty) * tw
            for i in range(4):
                r0, r1 = 2 * ty + idx[i, 0], 2 * ty + idx[i, 1]
                ci0, ci1 = coef[i, 0], coef[i, 1]
                for j in range(4):
                    cj0, cj1 = coef[j, 0], coef[j, 1]
                    u00, u01 = _at(r0, idx[j, 0], Wh, C), _at(r0, idx[j, 1], Wh, C)
                    u10, u11 = _at(r1, idx[j, 0], Wh, C), _at(r1, idx[j, 1], Wh, C)
                    dst = np.uint64(((4 * i + j) * T + t0) * C)
                    for q in range(run):
                        k = np.uint64(q)
                        of[dst + k] = (ci0 * (cj0 * plane[u00 + k] + cj1 * plane[u01 + k])
                                       + ci1 * (cj0 * plane[u10 + k] + cj1 * plane[u11 + k]))
    for c in range(acc.size):
        sums[c] = acc[c]


@njit(**_jit)
def scatter_tiles(rows, L, ph, pw, th, tw, bias, out):
    """Kernel of :func:`scatter_tiles_reference`; ``out`` (N, C, H, W) preallocated, ``bias``
    length C or 0."""
    N, C, H, W = out.shape
    m = L.shape[0]
    Hp, Wh, T = 2 * th + m - 2, tw + m // 2 - 1, rows.shape[1]
    plane = np.empty(Hp * 2 * Wh * C, out.dtype)
    rf = rows.reshape(-1)
    has_bias = bias.size > 0
    run = tw * C
    for n in range(N):
        plane[:] = 0
        for ty in range(th):
            t0 = (n * th + ty) * tw
            for a in range(m):
                for b in range(m):
                    dst = _at(2 * ty + a, b, Wh, C)
                    for i in range(4):
                        for j in range(4):
                            coef = L[a, i] * L[b, j]
                            if coef == 0:
                                continue
                            src = np.uint64(((4 * i + j) * T + t0) * C)
                            for q in range(run):
                                k = np.uint64(q)
                                plane[dst + k] += coef * rf[src + k]
        for h in range(H):
            for w in range(W):
                src = _at(h + ph, w + pw, Wh, C)
                if has_bias:
                    for c in range(C):
                        out[n, c, h, w] = plane[src + np.uint64(c)] + bias[c]
                else:
                    for c in range(C):
                        out[n, c, h, w] = plane[src + np.uint64(c)]
