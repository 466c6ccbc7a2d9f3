"""numba.cuda twins of ``bll_ref.layers.kernels``: same function names, argument order and
semantics, on device arrays (CuPy in production, numba's own device arrays in the simulator
tests), writing into the preallocated outputs. A layer picks the module by its input's type
(``K = kernels_for(x)``), so its call sites are the same on both devices.

How each pass maps onto the GPU:

* **elementwise** (im2col, conv output / GEMM layouts, LeakyReLU, BatchNorm apply and dx, max
  pool forward): one thread per output element in a grid-stride loop, ``THREADS`` per block.
* **gathers instead of scatters** (col2im, max pool backward): each output element adds its own
  contributions in the CPU kernel's order, starting from 0, so the result is deterministic and
  equals the CPU kernel bit for bit; no atomics.
* **reductions** (LayerNorm rows, BatchNorm per-channel statistics and dgamma / dbeta, the conv
  bias gradient): one block per row or channel; thread t adds elements t, t + T, ... in
  float64, then a shared-memory tree adds the T partials in a fixed order. Deterministic; equal
  to the CPU kernel's float64 sums within rounding (the order of additions differs).

Semantic differences from the CPU kernels: only in the last bits, from the order of the float64
sums above and from NVVM contracting a multiply and an add into one FMA (e.g. BatchNorm's
``xhat * gamma + beta``); on an H200 at most 2e-15 (float64) and 1.5e-7 (float32) relative to
the largest output. Copies, selects, col2im and max pooling are exact.

Kernels launch on CuPy's current stream for CuPy arrays (``backend.numba_stream``), so they run
in order with CuPy's own work; numba's device arrays (the simulator) use the default stream.
``PTX_SIGNATURES`` lists, for every ``@cuda.jit`` kernel, the argument types the layers pass;
the tests compile each to PTX on a machine without a GPU, which catches what the simulator
accepts and NVVM rejects (e.g. builtin ``max`` / ``min``: this module uses conditional
expressions instead). Device helpers are ``inline="always"``: compiling a separate device
function for PTX would try to initialise the driver.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.core import types

from .. import backend

__all__ = ["im2col_kernel", "col2im_kernel", "conv_out_kernel", "conv_dy_kernel",
           "leaky_relu_forward_kernel", "leaky_relu_backward_kernel",
           "layer_norm_forward_kernel", "layer_norm_backward_kernel",
           "batch_norm_stats_kernel", "batch_norm_apply_kernel", "batch_norm_backward_kernel",
           "max_pool_forward_kernel", "max_pool_backward_kernel",
           "THREADS", "REDUCE_THREADS", "MAX_BLOCKS", "PTX_SIGNATURES"]

#: Threads per block of the elementwise kernels.
THREADS = 256
#: Threads per block of the reductions: a power of two (the tree halves it) and the size of the
#: shared-memory buffers; the kernels read the block size from ``blockDim``, so a smaller power
#: of two also works (the simulator tests use one, to run faster).
REDUCE_THREADS = 256
#: Most blocks of one elementwise launch; larger arrays loop (grid-stride). 8192 x 256 threads
#: is about 15 waves of an H200, so the loop only matters for very large arrays.
MAX_BLOCKS = 8192


def _stream(a):
    """CuPy's current stream (as a numba stream) for a CuPy array, so the kernel queues behind
    CuPy's work; numba's default stream (0) for numba's own device arrays."""
    if type(a).__module__.startswith("cupy"):
        backend.cupy_module()  # numba_stream asks the CuPy module backend imported
        return backend.numba_stream()
    return 0


def _grid(n):
    """Blocks for n elements, one thread each, capped at MAX_BLOCKS (the kernels grid-stride)."""
    return min(-(-n // THREADS), MAX_BLOCKS)


# ---------------------------------------------------------------------------------------------
# device helpers

@cuda.jit(device=True, inline="always")
def _block_sum(buf, v):
    """Sum of every thread's v over the block (float64 shared ``buf``, at least blockDim long);
    a fixed tree, so the same inputs give the same bits. Every thread gets the sum."""
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()  # buf may be reused by the next sum
    return total


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
# im2col / col2im / conv layouts

@cuda.jit
def _im2col(x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    N, C, H, W = x.shape
    NP = N * Ho * Wo
    zero = cols.dtype.type(0)
    for k in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        row, col = k // NP, k % NP
        ci, j = row // kw, row % kw
        c, i = ci // kh, ci % kh
        nho, wo = col // Wo, col % Wo
        n, ho = nho // Ho, nho % Ho
        h, w = ho * sh + i - ph, wo * sw + j - pw
        inside = h >= 0 and h < H and w >= 0 and w < W
        cols[row, col] = x[n, c, h, w] if inside else zero


def im2col_kernel(x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    """x (N, C, H, W) C-contiguous -> cols (C*kh*kw, N*Ho*Wo): row (c, i, j), column (n, ho, wo),
    zero padding. One thread per element of cols."""
    if cols.size:
        _im2col[_grid(cols.size), THREADS, _stream(cols)](x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols)


@cuda.jit
def _col2im(dcols, kh, kw, sh, sw, ph, pw, Ho, Wo, dx):
    N, C, H, W = dx.shape
    P = Ho * Wo
    for k in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        nch, w = k // W, k % W
        nc, h = nch // H, nch % H
        n, c = nc // C, nc % C
        # the CPU kernel's order for one dx element: (i, j) ascending, from 0
        acc = dx.dtype.type(0)
        for i in range(kh):
            hs = h + ph - i  # = ho * sh
            if hs < 0:
                break
            ho = hs // sh
            if hs % sh != 0 or ho >= Ho:
                continue
            for j in range(kw):
                ws = w + pw - j
                if ws < 0:
                    break
                wo = ws // sw
                if ws % sw != 0 or wo >= Wo:
                    continue
                acc += dcols[(c * kh + i) * kw + j, n * P + ho * Wo + wo]
        dx[n, c, h, w] = acc


def col2im_kernel(dcols, kh, kw, sh, sw, ph, pw, Ho, Wo, dx):
    """Adjoint of im2col: dx (N, C, H, W) C-contiguous = sum of the dcols entries that im2col
    copied from each position; a gather (one thread per dx element, contributions in the CPU
    kernel's order), so it equals the CPU kernel exactly."""
    if dx.size:
        _col2im[_grid(dx.size), THREADS, _stream(dx)](dcols, kh, kw, sh, sw, ph, pw, Ho, Wo, dx)


@cuda.jit
def _conv_out(y2, bias, out):
    N, O, P = out.shape
    has_bias = bias.size > 0
    zero = out.dtype.type(0)
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        no, p = k // P, k % P
        n, o = no // O, no % O
        b = bias[o] if has_bias else zero
        out[n, o, p] = y2[o, n * P + p] + b


def conv_out_kernel(y2, bias, out):
    """y2 (O, N*P) -> out (N, O, P) = y2[o, n*P + p] + bias[o]  (bias of length O, or length 0)."""
    if out.size:
        _conv_out[_grid(out.size), THREADS, _stream(out)](y2, bias, out)


@cuda.jit
def _conv_dy_copy(dy, dy2):
    N, O, P = dy.shape
    for k in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        no, p = k // P, k % P
        n, o = no // O, no % O
        dy2[o, n * P + p] = dy[n, o, p]


@cuda.jit
def _conv_dy_bias(dy, dbias):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    N, O, P = dy.shape
    o = cuda.blockIdx.x
    s = np.float64(0.0)
    for k in range(cuda.threadIdx.x, N * P, cuda.blockDim.x):
        s += dy[k // P, o, k % P]
    s = _block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        dbias[o] = s


def conv_dy_kernel(dy, dy2, dbias):
    """dy (N, O, P) -> dy2 (O, N*P) (the GEMM layout) and dbias[o] = sum over n, p (length O or 0).

    The bias sum accumulates in float64 (one block per channel)."""
    stream = _stream(dy)
    if dy.size:
        _conv_dy_copy[_grid(dy.size), THREADS, stream](dy, dy2)
    if dbias.size:
        _conv_dy_bias[dbias.size, REDUCE_THREADS, stream](dy, dbias)


# ---------------------------------------------------------------------------------------------
# LeakyReLU

@cuda.jit
def _leaky_forward(x, slope, y, mask):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        pos = v > 0
        mask[i] = pos
        y[i] = v if pos else v * slope


def leaky_relu_forward_kernel(x, slope, y, mask):
    """y = x if x > 0 else slope * x; mask = x > 0 (flat arrays; slope = 0 is ReLU)."""
    if x.size:
        _leaky_forward[_grid(x.size), THREADS, _stream(x)](x, slope, y, mask)


@cuda.jit
def _leaky_backward(dy, mask, slope, dx):
    for i in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        v = dy[i]
        dx[i] = v if mask[i] else v * slope


def leaky_relu_backward_kernel(dy, mask, slope, dx):
    """dx = dy where mask else slope * dy (flat arrays)."""
    if dy.size:
        _leaky_backward[_grid(dy.size), THREADS, _stream(dy)](dy, mask, slope, dx)


# ---------------------------------------------------------------------------------------------
# LayerNorm: one block per row

@cuda.jit
def _layer_norm_forward(x, eps, xhat, inv_std):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    D = x.shape[1]
    r, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s = np.float64(0.0)
    for d in range(t, D, T):
        s += x[r, d]
    mean = _block_sum(buf, s) / D
    q = np.float64(0.0)
    for d in range(t, D, T):
        c = x[r, d] - mean
        q += c * c
    inv = 1.0 / math.sqrt(_block_sum(buf, q) / D + eps)
    if t == 0:
        inv_std[r] = inv
    mu, iv = x.dtype.type(mean), x.dtype.type(inv)
    for d in range(t, D, T):
        xhat[r, d] = (x[r, d] - mu) * iv


def layer_norm_forward_kernel(x, eps, xhat, inv_std):
    """Rows of x (M, D): xhat = (x - mean) / sqrt(var + eps), inv_std (M,) = 1 / sqrt(var + eps).

    Two passes over each row (mean, then centred second moment, as ``np.var``), sums in float64."""
    if x.shape[0]:
        _layer_norm_forward[x.shape[0], REDUCE_THREADS, _stream(x)](x, eps, xhat, inv_std)


@cuda.jit
def _layer_norm_backward(dxhat, xhat, inv_std, dx):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    buf2 = cuda.shared.array(REDUCE_THREADS, np.float64)
    D = dxhat.shape[1]
    r, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s1 = np.float64(0.0)
    s2 = np.float64(0.0)
    for d in range(t, D, T):
        g = dxhat[r, d]
        s1 += g
        s2 += g * xhat[r, d]  # the product in the array dtype, as the CPU kernel
    s1, s2 = _block_sum2(buf, buf2, s1, s2)
    dt = dxhat.dtype.type
    k = dt(np.float64(inv_std[r]) / D)
    a, b, n = dt(s1), dt(s2), dt(D)
    for d in range(t, D, T):
        dx[r, d] = k * (n * dxhat[r, d] - a - xhat[r, d] * b)


def layer_norm_backward_kernel(dxhat, xhat, inv_std, dx):
    """dx = inv_std / D * (D dxhat - sum(dxhat) - xhat * sum(dxhat * xhat)) per row (M, D)."""
    if dxhat.shape[0]:
        _layer_norm_backward[dxhat.shape[0], REDUCE_THREADS, _stream(dxhat)](dxhat, xhat, inv_std, dx)


# ---------------------------------------------------------------------------------------------
# BatchNorm: statistics and parameter gradients one block per channel, the rest elementwise

@cuda.jit
def _batch_norm_stats(x, mean, var):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    N, C, P = x.shape
    m = N * P
    c, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s = np.float64(0.0)
    for k in range(t, m, T):
        s += x[k // P, c, k % P]
    mu = _block_sum(buf, s) / m
    q = np.float64(0.0)
    for k in range(t, m, T):
        d = x[k // P, c, k % P] - mu
        q += d * d
    q = _block_sum(buf, q)
    if t == 0:
        mean[c] = mu
        var[c] = q / m


def batch_norm_stats_kernel(x, mean, var):
    """x (N, C, P) -> per-channel mean and biased variance (float64; two passes, as ``np.var``)."""
    if x.shape[1]:
        _batch_norm_stats[x.shape[1], REDUCE_THREADS, _stream(x)](x, mean, var)


@cuda.jit
def _batch_norm_apply(x, mean, inv_std, gamma, beta, xhat, y):
    N, C, P = x.shape
    dt = x.dtype.type
    for k in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        nc, p = k // P, k % P
        n, c = nc // C, nc % C
        h = (x[n, c, p] - dt(mean[c])) * dt(inv_std[c])
        xhat[n, c, p] = h
        y[n, c, p] = h * gamma[c] + beta[c]


def batch_norm_apply_kernel(x, mean, inv_std, gamma, beta, xhat, y):
    """xhat = (x - mean[c]) * inv_std[c]; y = gamma[c] * xhat + beta[c]  (x, xhat, y: (N, C, P))."""
    if x.size:
        _batch_norm_apply[_grid(x.size), THREADS, _stream(x)](x, mean, inv_std, gamma, beta, xhat, y)


@cuda.jit
def _batch_norm_backward_sums(dy, xhat, dgamma, dbeta):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    buf2 = cuda.shared.array(REDUCE_THREADS, np.float64)
    N, C, P = dy.shape
    c, t, T = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s1 = np.float64(0.0)
    s2 = np.float64(0.0)
    for k in range(t, N * P, T):
        n, p = k // P, k % P
        g = dy[n, c, p]
        s1 += g
        s2 += g * xhat[n, c, p]  # the product in the array dtype, as the CPU kernel
    s1, s2 = _block_sum2(buf, buf2, s1, s2)
    if t == 0:
        dgamma[c] = s2
        dbeta[c] = s1


@cuda.jit
def _batch_norm_backward_dx(dy, xhat, gamma, inv_std, batch, dgamma, dbeta, dx):
    N, C, P = dy.shape
    m = N * P
    dt = dy.dtype.type
    for k in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        nc, p = k // P, k % P
        n, c = nc // C, nc % C
        gi = gamma[c] * inv_std[c]
        if batch:
            km, a, b = dt(np.float64(gi) / m), dt(dbeta[c]), dt(dgamma[c])
            dx[n, c, p] = km * (dt(m) * dy[n, c, p] - a - xhat[n, c, p] * b)
        else:
            dx[n, c, p] = dt(gi) * dy[n, c, p]


def batch_norm_backward_kernel(dy, xhat, gamma, inv_std, batch, dx, dgamma, dbeta):
    """dgamma = sum dy xhat, dbeta = sum dy per channel (float64 sums); with batch statistics
    dx = gamma inv_std / m (m dy - dbeta - xhat dgamma), else (frozen) dx = gamma inv_std dy.

    Two launches: the sums (one block per channel), then dx (elementwise; it reads dgamma and
    dbeta back, so they should be float64 or the array dtype, as the CPU kernel's sums are)."""
    stream = _stream(dy)
    if dy.shape[1]:
        _batch_norm_backward_sums[dy.shape[1], REDUCE_THREADS, stream](dy, xhat, dgamma, dbeta)
    if dy.size:
        _batch_norm_backward_dx[_grid(dy.size), THREADS, stream](dy, xhat, gamma, inv_std, bool(batch),
                                                                 dgamma, dbeta, dx)


# ---------------------------------------------------------------------------------------------
# MaxPool2d

@cuda.jit
def _max_pool_forward(x, kh, kw, sh, sw, y, arg):
    N, C, Ho, Wo = y.shape
    for k in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        ncho, wo = k // Wo, k % Wo
        nc, ho = ncho // Ho, ncho % Ho
        n, c = nc // C, nc % C
        h0, w0 = ho * sh, wo * sw
        best = x[n, c, h0, w0]
        a = 0
        for i in range(kh):
            for j in range(kw):
                o = i * kw + j
                if o == 0:
                    continue
                v = x[n, c, h0 + i, w0 + j]
                gt = v > best
                a = o if gt else a
                best = v if (gt or v != v) else best  # a NaN sticks, as np.maximum
        y[n, c, ho, wo] = best
        arg[n, c, ho, wo] = a


def max_pool_forward_kernel(x, kh, kw, sh, sw, y, arg):
    """y[n, c, ho, wo] = max over the window, arg = its offset i*kw + j (the first on ties; a NaN
    in the window makes y NaN, as np.maximum, and keeps the offset of the last strict maximum)."""
    if y.size:
        _max_pool_forward[_grid(y.size), THREADS, _stream(y)](x, kh, kw, sh, sw, y, arg)


@cuda.jit
def _max_pool_backward(dy, arg, kh_max, kw, sh, sw, dx):
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    for k in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        nch, w = k // W, k % W
        nc, h = nch // H, nch % H
        n, c = nc // C, nc % C
        # windows (ho, wo) holding (h, w): ho*sh <= h < ho*sh + kh, wo*sw <= w < wo*sw + kw
        lo = h - kh_max + 1
        ho_lo = (lo + sh - 1) // sh if lo > 0 else 0
        ho_hi = h // sh if h // sh < Ho else Ho - 1
        lo = w - kw + 1
        wo_lo = (lo + sw - 1) // sw if lo > 0 else 0
        wo_hi = w // sw if w // sw < Wo else Wo - 1
        acc = dx.dtype.type(0)
        for ho in range(ho_lo, ho_hi + 1):  # row-major, as the CPU kernel adds them
            for wo in range(wo_lo, wo_hi + 1):
                if arg[n, c, ho, wo] == (h - ho * sh) * kw + (w - wo * sw):
                    acc += dy[n, c, ho, wo]
        dx[n, c, h, w] = acc


def max_pool_backward_kernel(dy, arg, kw, sh, sw, dx):
    """dx = 0, then each dy goes to its window's argmax: dx[n, c, ho*sh + i, wo*sw + j] += dy.

    A gather (one thread per dx element, windows in the CPU kernel's order): equals the CPU
    kernel exactly. The window height is not an argument; the last window fits inside dx, so
    kh <= H - (Ho - 1) * sh bounds the windows to search."""
    if dx.size:
        kh_max = dx.shape[2] - (dy.shape[2] - 1) * sh
        _max_pool_backward[_grid(dx.size), THREADS, _stream(dx)](dy, arg, kh_max, kw, sh, sw, dx)


# ---------------------------------------------------------------------------------------------
# argument types the layers pass, per kernel (float32 first, then float64): the PTX test
# compiles every kernel with each, and checks that every kernel of this module is listed

def _signatures():
    i64, b1, f64_1 = types.int64, types.boolean, types.float64[::1]
    out = {}

    def add(name, *sigs):
        out.setdefault(name, []).extend(sigs)

    for f in (types.float32, types.float64):
        v1, m2, t3, t4 = f[::1], f[:, ::1], f[:, :, ::1], f[:, :, :, ::1]
        ints = (i64,) * 8  # kh, kw, sh, sw, ph, pw, Ho, Wo
        add("_im2col", (t4, *ints, m2))
        add("_col2im", (m2, *ints, t4))
        add("_conv_out", (m2, v1, t3))
        add("_conv_dy_copy", (t3, m2))
        add("_conv_dy_bias", (t3, v1), (t3, f64_1))
        add("_leaky_forward", (v1, f, v1, b1[::1]))
        add("_leaky_backward", (v1, b1[::1], f, v1))
        add("_layer_norm_forward", (m2, types.float64, m2, v1))
        add("_layer_norm_backward", (m2, m2, v1, m2))
        add("_batch_norm_stats", (t3, f64_1, f64_1))
        # batch statistics arrive in float64, running ones in the layer dtype
        add("_batch_norm_apply", (t3, f64_1, v1, v1, v1, t3, t3), (t3, v1, v1, v1, v1, t3, t3))
        add("_batch_norm_backward_sums", (t3, t3, f64_1, f64_1))
        add("_batch_norm_backward_dx", (t3, t3, v1, v1, b1, f64_1, f64_1, t3))
        for a in (types.int8, types.int32):  # arg is int8 below 128 window offsets
            add("_max_pool_forward", (t4, i64, i64, i64, i64, t4, a[:, :, :, ::1]))
            add("_max_pool_backward", (t4, a[:, :, :, ::1], i64, i64, i64, i64, t4))
    return out


#: {kernel name: [argument type tuples]} for ``numba.cuda.compile_ptx``.
PTX_SIGNATURES = _signatures()
