"""numba.cuda twins of the convolution and pooling kernels of ``bll_ref.layers.kernels``
(im2col, col2im, the conv output / GEMM layouts, MaxPool2d), and the launch machinery that
:mod:`bll_ref.gpu.norm_kernels` shares: the launch settings (``THREADS``, ``REDUCE_THREADS``,
``MAX_BLOCKS``, read here at every launch), the block sum and :class:`_Kernels`.
:mod:`bll_ref.gpu.layer_kernels` is the public face (the layers call it) and explains how the
kernels map onto the GPU, why they take pointers and how exact they are.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, from_dtype, types

from .launch import KernelLauncher, array_args, like

__all__ = ["im2col_kernel", "col2im_kernel", "conv_out_kernel", "conv_dy_kernel",
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


# ---------------------------------------------------------------------------------------------
# launching: one KernelLauncher per kernel, keyed by the dtypes of its array arguments

class _Kernels:
    """The kernels of one module: ``signatures`` ``{kernel: {key: argument types}}`` (its
    ``PTX_SIGNATURES``), ``keys`` ``{kernel: {array dtypes: key}}`` and one launcher per kernel.

    ``fill(add)`` lists the signatures: ``add(name, *params)`` with NumPy dtypes for the pointer
    parameters (bool as uint8 bytes: numba cannot store through a boolean pointer) and numba
    types for the scalars; the key names the distinct array dtypes in order (e.g.
    ``float32_float64``). ``namespace``: the module's globals, where the kernels are."""

    def __init__(self, namespace, fill):
        numba_type = {np.dtype(np.bool_): types.uint8}
        self.signatures, self.keys = {}, {}

        def add(name, *params):
            arrays = tuple(p for p in params if isinstance(p, np.dtype))
            key = "_".join(dict.fromkeys(d.name for d in arrays))
            sig = tuple(types.CPointer(numba_type.get(p) or from_dtype(p)) if isinstance(p, np.dtype) else p
                        for p in params)
            if self.signatures.setdefault(name, {}).setdefault(key, sig) != sig:  # pragma: no cover - a typo
                raise RuntimeError(f"{name}: two signatures under the key {key}")
            self.keys.setdefault(name, {})[arrays] = key

        fill(add)
        self.launchers = {name: KernelLauncher(namespace[name], sigs) for name, sigs in self.signatures.items()}

    def launch(self, name, who, names, arrays, grid, block, build):
        """Launch kernel ``name`` on ``arrays`` (in the order of its pointer parameters); ``build``
        turns their kernel arguments into the full argument tuple."""
        key = self.keys[name].get(tuple([a.dtype for a in arrays]))
        if key is None:
            got = ", ".join(f"{n} {np.dtype(a.dtype)}" for n, a in zip(names, arrays))
            want = "; ".join(", ".join(f"{n} {d}" for n, d in zip(names, ds)) for ds in self.keys[name])
            raise ValueError(f"{who} takes arrays of dtypes ({want}), got ({got})")
        ptrs, stream, device = array_args(who, names, arrays)
        self.launchers[name](key, grid, block, stream, build(*ptrs), device)

    def elementwise(self, name, who, names, arrays, n, build):
        """One thread per element of n: ``_grid(n)`` blocks of THREADS (grid-stride beyond)."""
        self.launch(name, who, names, arrays, _grid(n), THREADS, build)

    def per_block(self, name, who, names, arrays, blocks, build):
        """One block of REDUCE_THREADS per row or channel."""
        self.launch(name, who, names, arrays, blocks, REDUCE_THREADS, build)


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
        _K.elementwise("_im2col", "im2col_kernel", ("x", "cols"), (x, cols), cols.size,
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
        _K.elementwise("_col2im", "col2im_kernel", ("dcols", "dx"), (dcols, dx), dx.size,
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
        _K.elementwise("_conv_out", "conv_out_kernel", ("y2", "bias", "out"), (y2, bias, out), out.size,
                 lambda yp, bp, op: (yp, bp, N, O, P, bias.size, op))


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
        _K.elementwise("_conv_dy_copy", "conv_dy_kernel", ("dy", "dy2"), (dy, dy2), dy.size,
                lambda dp, d2: (dp, N, O, P, d2))
    if dbias.size:
        _K.per_block("_conv_dy_bias", "conv_dy_kernel", ("dy", "dbias"), (dy, dbias), dbias.size,
                lambda dp, bp: (dp, N, O, P, bp))


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
        _K.elementwise("_max_pool_forward", "max_pool_forward_kernel", ("x", "y", "arg"), (x, y, arg), y.size,
                 lambda xp, yp, ap: (xp, H, W, kh, kw, sh, sw, N, C, Ho, Wo, yp, ap))


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
        _K.elementwise("_max_pool_backward", "max_pool_backward_kernel", ("dy", "arg", "dx"), (dy, arg, dx),
                dx.size, lambda gp, ap, xp: (gp, ap, Ho, Wo, kh_max, kw, sh, sw, N, C, H, W, xp))


# ---------------------------------------------------------------------------------------------
# signatures: per kernel, per combination of array dtypes the layers pass (float32 first, then
# float64). The PTX test compiles every kernel with each and checks that every kernel is listed.

def _fill(add):
    i64, d64 = types.int64, np.dtype(np.float64)
    for dt in (np.dtype(np.float32), d64):
        add("_im2col", dt, *(i64,) * 12, dt)
        add("_col2im", dt, *(i64,) * 12, dt)
        add("_conv_out", dt, dt, i64, i64, i64, i64, dt)
        add("_conv_dy_copy", dt, i64, i64, i64, dt)
        for bias in (dt, d64):  # dbias: the layer dtype (Conv2d) or float64
            add("_conv_dy_bias", dt, i64, i64, i64, bias)
        for a in (np.dtype(np.int8), np.dtype(np.int32)):  # arg is int8 below 128 window offsets
            add("_max_pool_forward", dt, *(i64,) * 10, dt, a)
            add("_max_pool_backward", dt, a, *(i64,) * 10, dt)


_K = _Kernels(globals(), _fill)
#: {kernel name: {key: argument types}} for ``numba.cuda.compile_ptx`` and the launchers.
PTX_SIGNATURES = _K.signatures
