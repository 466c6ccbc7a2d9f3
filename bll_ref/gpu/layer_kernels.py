"""numba.cuda twins of ``bll_ref.layers.kernels``: same function names, argument order and
semantics, on device arrays (CuPy in production, numba's own device arrays in the simulator
tests), writing into the preallocated outputs. A layer picks the module by its input's type
(``K = kernels_for(x)``), so its call sites are the same on both devices.

Launching (why the kernels take pointers): numba's ordinary ``kernel[grid, block, stream](cupy,
...)`` cost ~128 us of host time per call on an H200 machine with numba-cuda 0.30.4 (numba types
and re-wraps every CuPy argument through DLPack on each call; ``bll_ref.gpu.launch`` has the
details), and a BLL training step calls dozens of these kernels. So every kernel here takes raw
device pointers (``CPointer`` parameters) plus the dimensions it needs as int64 (flat C-order
indexing inside), is compiled once per dtype combination for an explicit signature, and is
launched through :class:`bll_ref.gpu.launch.KernelLauncher` (``cuda.core.launch`` with a cached
launch configuration and stream): ~18 us per call on the same machine. Every array argument must
therefore be C-contiguous (ValueError naming it otherwise, never a silent copy); the layers pass
contiguous arrays (``ascontiguousarray`` inputs, fresh ``empty`` outputs, leading-axis slices of
those; the one exception would be Conv2d's ``dy.reshape(n, O, -1)``, a view when the incoming
dy is a strided array that reshapes without a copy). A CuPy view's address is its first
element (``data.ptr`` includes the offset), so ``y[s:e]`` is written in place. Masks are bool
arrays, read and written as bytes (0 / 1).

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

Arithmetic in the array dtype where the CPU kernel uses it (``like(p, v)``: v rounded to the
element type of pointer p, as ``x.dtype.type(v)`` on the CPU). Semantic differences from the CPU
kernels: only in the last bits, from the order of the float64 sums above and from NVVM
contracting a multiply and an add into one FMA (e.g. BatchNorm's ``xhat * gamma + beta``); on an
H200 at most 2e-15 (float64) and 1.5e-7 (float32) relative to the largest output (measured with
the earlier, array-argument version of these kernels). Copies, selects, col2im and max pooling
are exact.

Kernels launch on CuPy's current stream for CuPy arrays, so they run in order with CuPy's own
work; numba's device arrays (the simulator) use the default stream. ``PTX_SIGNATURES`` lists,
for every ``@cuda.jit`` kernel, the signatures it is compiled for (keyed by the dtypes of its
arrays); the tests compile each to PTX on a machine without a GPU, which catches what the
simulator accepts and NVVM rejects (e.g. builtin ``max`` / ``min``: this module uses
conditional expressions instead). Device helpers are ``inline="always"``: compiling a separate
device function for PTX would try to initialise the driver.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, from_dtype, types

from .launch import KernelLauncher, array_args, like

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
# launching: one KernelLauncher per kernel, keyed by the dtypes of its array arguments

def _launch(name, who, names, arrays, grid, block, build):
    """Launch kernel ``name`` on ``arrays`` (in the order of its pointer parameters); ``build``
    turns their kernel arguments into the full argument tuple."""
    key = _KEYS[name].get(tuple([a.dtype for a in arrays]))
    if key is None:
        got = ", ".join(f"{n} {np.dtype(a.dtype)}" for n, a in zip(names, arrays))
        want = "; ".join(", ".join(f"{n} {d}" for n, d in zip(names, ds)) for ds in _KEYS[name])
        raise ValueError(f"{who} takes arrays of dtypes ({want}), got ({got})")
    ptrs, stream, device = array_args(who, names, arrays)
    _LAUNCHERS[name](key, grid, block, stream, build(*ptrs), device)


# ---------------------------------------------------------------------------------------------
# im2col / col2im / conv layouts

@cuda.jit
def _im2col(x, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    NP = N * Ho * Wo
    for k in range(cuda.grid(1), C * kh * kw * NP, cuda.gridsize(1)):
        row, col = k // NP, k % NP
        ci, j = row // kw, row % kw
        c, i = ci // kh, ci % kh
        nho, wo = col // Wo, col % Wo
        n, ho = nho // Ho, nho % Ho
        h, w = ho * sh + i - ph, wo * sw + j - pw
        if h >= 0 and h < H and w >= 0 and w < W:
            cols[k] = x[((n * C + c) * H + h) * W + w]
        else:
            cols[k] = 0


def im2col_kernel(x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    """x (N, C, H, W) C-contiguous -> cols (C*kh*kw, N*Ho*Wo): row (c, i, j), column (n, ho, wo),
    zero padding. One thread per element of cols."""
    if cols.size:
        N, C, H, W = x.shape
        _launch("_im2col", "im2col_kernel", ("x", "cols"), (x, cols), _grid(cols.size), THREADS,
                lambda xp, cp: (xp, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, cp))


@cuda.jit
def _col2im(dcols, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, dx):
    P = Ho * Wo
    NP = N * P
    for k in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        nch, w = k // W, k % W
        nc, h = nch // H, nch % H
        n, c = nc // C, nc % C
        # the CPU kernel's order for one dx element: (i, j) ascending, from 0
        acc = like(dx, 0)
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
                acc += dcols[((c * kh + i) * kw + j) * NP + n * P + ho * Wo + wo]
        dx[k] = acc


def col2im_kernel(dcols, kh, kw, sh, sw, ph, pw, Ho, Wo, dx):
    """Adjoint of im2col: dx (N, C, H, W) C-contiguous = sum of the dcols entries that im2col
    copied from each position; a gather (one thread per dx element, contributions in the CPU
    kernel's order), so it equals the CPU kernel exactly."""
    if dx.size:
        N, C, H, W = dx.shape
        _launch("_col2im", "col2im_kernel", ("dcols", "dx"), (dcols, dx), _grid(dx.size), THREADS,
                lambda dp, xp: (dp, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, xp))


@cuda.jit
def _conv_out(y2, bias, N, O, P, nb, out):
    NP = N * P
    for k in range(cuda.grid(1), N * O * P, cuda.gridsize(1)):
        no, p = k // P, k % P
        n, o = no // O, no % O
        b = bias[o] if nb > 0 else like(out, 0)
        out[k] = y2[o * NP + n * P + p] + b


def conv_out_kernel(y2, bias, out):
    """y2 (O, N*P) -> out (N, O, P) = y2[o, n*P + p] + bias[o]  (bias of length O, or length 0)."""
    if out.size:
        N, O, P = out.shape
        _launch("_conv_out", "conv_out_kernel", ("y2", "bias", "out"), (y2, bias, out), _grid(out.size),
                THREADS, lambda yp, bp, op: (yp, bp, N, O, P, bias.size, op))


@cuda.jit
def _conv_dy_copy(dy, N, O, P, dy2):
    NP = N * P
    for k in range(cuda.grid(1), N * O * P, cuda.gridsize(1)):
        no, p = k // P, k % P
        n, o = no // O, no % O
        dy2[o * NP + n * P + p] = dy[k]


@cuda.jit
def _conv_dy_bias(dy, N, O, P, dbias):
    buf = cuda.shared.array(REDUCE_THREADS, np.float64)
    o = cuda.blockIdx.x
    s = np.float64(0.0)
    for k in range(cuda.threadIdx.x, N * P, cuda.blockDim.x):
        s += dy[((k // P) * O + o) * P + k % P]
    s = _block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        dbias[o] = s


def conv_dy_kernel(dy, dy2, dbias):
    """dy (N, O, P) -> dy2 (O, N*P) (the GEMM layout) and dbias[o] = sum over n, p (length O or 0).

    The bias sum accumulates in float64 (one block per channel); dbias is float64 or dy's dtype."""
    N, O, P = dy.shape
    if dy.size:
        _launch("_conv_dy_copy", "conv_dy_kernel", ("dy", "dy2"), (dy, dy2), _grid(dy.size), THREADS,
                lambda dp, d2: (dp, N, O, P, d2))
    if dbias.size:
        _launch("_conv_dy_bias", "conv_dy_kernel", ("dy", "dbias"), (dy, dbias), dbias.size, REDUCE_THREADS,
                lambda dp, bp: (dp, N, O, P, bp))


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
        _launch("_leaky_forward", "leaky_relu_forward_kernel", ("x", "y", "mask"), (x, y, mask),
                _grid(x.size), THREADS, lambda xp, yp, mp: (xp, slope, yp, mp, x.size))


@cuda.jit
def _leaky_backward(dy, mask, slope, dx, n):
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        v = dy[i]
        dx[i] = v if mask[i] != 0 else v * slope


def leaky_relu_backward_kernel(dy, mask, slope, dx):
    """dx = dy where mask else slope * dy (flat arrays)."""
    if dy.size:
        _launch("_leaky_backward", "leaky_relu_backward_kernel", ("dy", "mask", "dx"), (dy, mask, dx),
                _grid(dy.size), THREADS, lambda gp, mp, xp: (gp, mp, slope, xp, dy.size))


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
        _launch("_layer_norm_forward", "layer_norm_forward_kernel", ("x", "xhat", "inv_std"), (x, xhat, inv_std),
                M, REDUCE_THREADS, lambda xp, hp, ip: (xp, D, eps, hp, ip))


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
        _launch("_layer_norm_backward", "layer_norm_backward_kernel", ("dxhat", "xhat", "inv_std", "dx"),
                (dxhat, xhat, inv_std, dx), M, REDUCE_THREADS, lambda gp, hp, ip, xp: (gp, hp, ip, D, xp))


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
        _launch("_batch_norm_stats", "batch_norm_stats_kernel", ("x", "mean", "var"), (x, mean, var),
                C, REDUCE_THREADS, lambda xp, mp, vp: (xp, N, C, P, mp, vp))


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
        _launch("_batch_norm_apply", "batch_norm_apply_kernel",
                ("x", "mean", "inv_std", "gamma", "beta", "xhat", "y"), (x, mean, inv_std, gamma, beta, xhat, y),
                _grid(x.size), THREADS,
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
        _launch("_batch_norm_backward_sums", "batch_norm_backward_kernel", ("dy", "xhat", "dgamma", "dbeta"),
                (dy, xhat, dgamma, dbeta), C, REDUCE_THREADS, lambda gp, hp, ap, bp: (gp, hp, N, C, P, ap, bp))
    if dy.size:
        _launch("_batch_norm_backward_dx", "batch_norm_backward_kernel",
                ("dy", "xhat", "gamma", "inv_std", "dgamma", "dbeta", "dx"),
                (dy, xhat, gamma, inv_std, dgamma, dbeta, dx), _grid(dy.size), THREADS,
                lambda gp, hp, cp, ip, ap, bp, xp: (gp, hp, cp, ip, 1 if batch else 0, ap, bp, N, C, P, xp))


# ---------------------------------------------------------------------------------------------
# MaxPool2d (arg: int8 below 128 window offsets, else int32)

@cuda.jit
def _max_pool_forward(x, H, W, kh, kw, sh, sw, N, C, Ho, Wo, y, arg):
    for k in range(cuda.grid(1), N * C * Ho * Wo, cuda.gridsize(1)):
        ncho, wo = k // Wo, k % Wo
        nc, ho = ncho // Ho, ncho % Ho
        x0 = (nc * H + ho * sh) * W + wo * sw  # x[n, c, ho*sh, wo*sw]
        best = x[x0]
        a = 0
        for i in range(kh):
            for j in range(kw):
                o = i * kw + j
                if o == 0:
                    continue
                v = x[x0 + i * W + j]
                gt = v > best
                a = o if gt else a
                best = v if (gt or v != v) else best  # a NaN sticks, as np.maximum
        y[k] = best
        arg[k] = a


def max_pool_forward_kernel(x, kh, kw, sh, sw, y, arg):
    """y[n, c, ho, wo] = max over the window, arg = its offset i*kw + j (the first on ties; a NaN
    in the window makes y NaN, as np.maximum, and keeps the offset of the last strict maximum)."""
    if y.size:
        N, C, Ho, Wo = y.shape
        H, W = x.shape[2], x.shape[3]
        _launch("_max_pool_forward", "max_pool_forward_kernel", ("x", "y", "arg"), (x, y, arg), _grid(y.size),
                THREADS, lambda xp, yp, ap: (xp, H, W, kh, kw, sh, sw, N, C, Ho, Wo, yp, ap))


@cuda.jit
def _max_pool_backward(dy, arg, Ho, Wo, kh_max, kw, sh, sw, N, C, H, W, dx):
    for k in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        nch, w = k // W, k % W
        nc, h = nch // H, nch % H
        # windows (ho, wo) holding (h, w): ho*sh <= h < ho*sh + kh, wo*sw <= w < wo*sw + kw
        lo = h - kh_max + 1
        ho_lo = (lo + sh - 1) // sh if lo > 0 else 0
        ho_hi = h // sh if h // sh < Ho else Ho - 1
        lo = w - kw + 1
        wo_lo = (lo + sw - 1) // sw if lo > 0 else 0
        wo_hi = w // sw if w // sw < Wo else Wo - 1
        plane = nc * Ho * Wo
        acc = like(dx, 0)
        for ho in range(ho_lo, ho_hi + 1):  # row-major, as the CPU kernel adds them
            for wo in range(wo_lo, wo_hi + 1):
                if arg[plane + ho * Wo + wo] == (h - ho * sh) * kw + (w - wo * sw):
                    acc += dy[plane + ho * Wo + wo]
        dx[k] = acc


def max_pool_backward_kernel(dy, arg, kw, sh, sw, dx):
    """dx = 0, then each dy goes to its window's argmax: dx[n, c, ho*sh + i, wo*sw + j] += dy.

    A gather (one thread per dx element, windows in the CPU kernel's order): equals the CPU
    kernel exactly. The window height is not an argument; the last window fits inside dx, so
    kh <= H - (Ho - 1) * sh bounds the windows to search."""
    if dx.size:
        N, C, H, W = dx.shape
        Ho, Wo = dy.shape[2], dy.shape[3]
        kh_max = H - (Ho - 1) * sh
        _launch("_max_pool_backward", "max_pool_backward_kernel", ("dy", "arg", "dx"), (dy, arg, dx),
                _grid(dx.size), THREADS, lambda gp, ap, xp: (gp, ap, Ho, Wo, kh_max, kw, sh, sw, N, C, H, W, xp))


# ---------------------------------------------------------------------------------------------
# signatures: per kernel, per combination of array dtypes the layers pass (float32 first, then
# float64). The PTX test compiles every kernel with each and checks that every kernel of this
# module is listed.

def _signatures():
    """(PTX_SIGNATURES, keys): ``{kernel: {key: signature}}`` and ``{kernel: {array dtypes: key}}``.

    A signature is written with NumPy dtypes for the pointer parameters (bool as uint8 bytes:
    numba cannot store through a boolean pointer) and numba types for the scalars; the key names
    the distinct array dtypes in order (e.g. ``float32_float64``)."""
    i64, f64 = types.int64, types.float64
    numba_type = {np.dtype(np.bool_): types.uint8}
    sigs, keys = {}, {}

    def add(name, *params):
        arrays = tuple(p for p in params if isinstance(p, np.dtype))
        key = "_".join(dict.fromkeys(d.name for d in arrays))
        sig = tuple(types.CPointer(numba_type.get(p) or from_dtype(p)) if isinstance(p, np.dtype) else p
                    for p in params)
        if sigs.setdefault(name, {}).setdefault(key, sig) != sig:  # pragma: no cover - a table typo
            raise RuntimeError(f"{name}: two signatures under the key {key}")
        keys.setdefault(name, {})[arrays] = key

    b, d64 = np.dtype(np.bool_), np.dtype(np.float64)
    for dt in (np.dtype(np.float32), d64):
        f = from_dtype(dt)
        add("_im2col", dt, *(i64,) * 12, dt)
        add("_col2im", dt, *(i64,) * 12, dt)
        add("_conv_out", dt, dt, i64, i64, i64, i64, dt)
        add("_conv_dy_copy", dt, i64, i64, i64, dt)
        for bias in (dt, d64):  # dbias: the layer dtype (Conv2d) or float64
            add("_conv_dy_bias", dt, i64, i64, i64, bias)
        add("_leaky_forward", dt, f, dt, b, i64)
        add("_leaky_backward", dt, b, f, dt, i64)
        add("_layer_norm_forward", dt, i64, f64, dt, dt)
        add("_layer_norm_backward", dt, dt, dt, i64, dt)
        add("_batch_norm_stats", dt, i64, i64, i64, d64, d64)
        for mean in (d64, dt):  # batch statistics arrive in float64, running ones in the layer dtype
            add("_batch_norm_apply", dt, mean, dt, dt, dt, i64, i64, i64, dt, dt)
        add("_batch_norm_backward_sums", dt, dt, i64, i64, i64, d64, d64)
        add("_batch_norm_backward_dx", dt, dt, dt, dt, i64, d64, d64, i64, i64, i64, dt)
        for a in (np.dtype(np.int8), np.dtype(np.int32)):  # arg is int8 below 128 window offsets
            add("_max_pool_forward", dt, *(i64,) * 10, dt, a)
            add("_max_pool_backward", dt, a, *(i64,) * 10, dt)
    return sigs, keys


#: {kernel name: {key: argument types}} for ``numba.cuda.compile_ptx`` and the launchers.
PTX_SIGNATURES, _KEYS = _signatures()
_LAUNCHERS = {name: KernelLauncher(globals()[name], sigs) for name, sigs in PTX_SIGNATURES.items()}
