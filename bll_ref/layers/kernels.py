"""Numba kernels of the layers' memory-bound passes: im2col / col2im, the Conv2d output and
input-gradient layouts (with the bias fused in), and the ReLU / LeakyReLU passes.

Each kernel has a NumPy twin that is the specification (the plain array code in ``conv.py`` and
``activation.py``, reached with ``use_kernels=False`` or ``reference_*`` below); tests assert that
they agree exactly (these kernels only copy, add or compare, except the bias sums, which
agree to float rounding). Pure functions: arrays in, preallocated ``out``, no globals, so
``NUMBA_DISABLE_JIT=1`` runs the same source.

Why: NumPy's im2col through ``sliding_window_view`` + transpose + reshape gathers with 6-d
strides, col2im adds kh*kw strided slices into a padded buffer and transposes it back, and the
output layout change plus the bias add are two more passes. At batch 128, 32 -> 64 channels,
14x14, these passes cost about as much as the three GEMMs' non-GEMM budget (issue 10).
Serial like the other kernels: pipeline worker threads and BLAS share the cores.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["im2col_kernel", "col2im_kernel", "conv_out_kernel", "conv_dy_kernel",
           "leaky_relu_forward_kernel", "leaky_relu_backward_kernel", "layer_norm_forward_kernel",
           "layer_norm_backward_kernel", "batch_norm_stats_kernel", "batch_norm_apply_kernel",
           "batch_norm_backward_kernel", "max_pool_forward_kernel", "max_pool_backward_kernel"]

# error_model="numpy": no ZeroDivisionError branches (there is no division), so loops vectorise.
_jit = dict(cache=True, nogil=True, error_model="numpy")
# Row sums may reassociate (vectorised partial sums); float64 accumulators keep them within ~1e-15
# relative of a sequential sum, so the 1e-12 float64 agreement with the NumPy twins still holds.
_jit_sums = dict(_jit, fastmath={"reassoc"})


@njit(**_jit)
def _valid_range(k_off, pad, stride, n_out, n_in):
    """[lo, hi) of output positions o with 0 <= o*stride + k_off - pad < n_in."""
    lo = 0
    while lo < n_out and lo * stride + k_off - pad < 0:
        lo += 1
    hi = n_out
    while hi > lo and (hi - 1) * stride + k_off - pad >= n_in:
        hi -= 1
    return lo, hi


@njit(**_jit)
def im2col_kernel(x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    """x (N, C, H, W) C-contiguous -> cols (C*kh*kw, N*Ho*Wo): row (c, i, j), column (n, ho, wo),
    zero padding. Works on flat views with unsigned offsets: Numba then emits no negative-index
    wrap-around branch. Stride 1 with Wo == W (e.g. 3x3, padding 1) copies each plane as one long
    run at a fixed offset (rows of 14 are too short to vectorise), then zeroes the few columns
    where that run crossed a row end."""
    N, C, H, W = x.shape
    P, NP = Ho * Wo, N * Ho * Wo
    xf, cf = x.reshape(-1), cols.reshape(-1)
    zero = cols.dtype.type(0)
    flat = sh == 1 and sw == 1 and Wo == W
    for c in range(C):
        for i in range(kh):
            ho_lo, ho_hi = _valid_range(i, ph, sh, Ho, H)
            for j in range(kw):
                wo_lo, wo_hi = _valid_range(j, pw, sw, Wo, W)
                dst_r = np.uint64(((c * kh + i) * kw + j) * NP)
                if flat:
                    k0, k1 = ho_lo * Wo + wo_lo, (ho_hi - 1) * Wo + wo_hi  # first, last+1 valid k
                    if ho_lo >= ho_hi or wo_lo >= wo_hi:
                        k0 = k1 = 0
                    for n in range(N):
                        dst = dst_r + np.uint64(n * P)
                        for k in range(k0):
                            cf[dst + np.uint64(k)] = zero
                        # one long run: src index k + (i - ph) * W + (j - pw) >= 0 for every k >= k0
                        base = np.uint64((n * C + c) * H * W + k0 + (i - ph) * W + (j - pw))
                        d0 = dst + np.uint64(k0)
                        for t in range(k1 - k0):
                            cf[d0 + np.uint64(t)] = xf[base + np.uint64(t)]
                        for k in range(k1, P):
                            cf[dst + np.uint64(k)] = zero
                        # the run read across row ends: zero the columns no window reaches
                        for ho in range(ho_lo, ho_hi):
                            row = dst + np.uint64(ho * Wo)
                            for wo in range(wo_lo):
                                cf[row + np.uint64(wo)] = zero
                            for wo in range(wo_hi, Wo):
                                cf[row + np.uint64(wo)] = zero
                    continue
                for n in range(N):
                    for ho in range(Ho):
                        dst = dst_r + np.uint64(n * P + ho * Wo)
                        if ho < ho_lo or ho >= ho_hi or wo_lo >= wo_hi:
                            for wo in range(Wo):
                                cf[dst + np.uint64(wo)] = zero
                            continue
                        for wo in range(wo_lo):
                            cf[dst + np.uint64(wo)] = zero
                        src = np.uint64(((n * C + c) * H + ho * sh + i - ph) * W + wo_lo * sw + j - pw)
                        d0 = dst + np.uint64(wo_lo)
                        for t in range(wo_hi - wo_lo):
                            cf[d0 + np.uint64(t)] = xf[src + np.uint64(t * sw)]
                        for wo in range(wo_hi, Wo):
                            cf[dst + np.uint64(wo)] = zero


@njit(**_jit)
def col2im_kernel(dcols, kh, kw, sh, sw, ph, pw, Ho, Wo, dx):
    """Adjoint of im2col: dx (N, C, H, W) C-contiguous = 0, then
    dx[n, c, ho*sh+i-ph, wo*sw+j-pw] += dcols[(c,i,j), (n,ho,wo)]; flat views, unsigned offsets.
    (im2col's long-run trick made this slower: a buffer pass plus the row fix-ups cost more than
    the short adds.)"""
    N, C, H, W = dx.shape
    P, NP = Ho * Wo, N * Ho * Wo
    df, gf = dcols.reshape(-1), dx.reshape(-1)
    gf[:] = 0
    for n in range(N):
        for c in range(C):
            for i in range(kh):
                ho_lo, ho_hi = _valid_range(i, ph, sh, Ho, H)
                for j in range(kw):
                    wo_lo, wo_hi = _valid_range(j, pw, sw, Wo, W)
                    src_r = np.uint64(((c * kh + i) * kw + j) * NP + n * P)
                    for ho in range(ho_lo, ho_hi):
                        src = src_r + np.uint64(ho * Wo + wo_lo)
                        dst = np.uint64(((n * C + c) * H + ho * sh + i - ph) * W + wo_lo * sw + j - pw)
                        for t in range(wo_hi - wo_lo):
                            gf[dst + np.uint64(t * sw)] += df[src + np.uint64(t)]


@njit(**_jit)
def conv_out_kernel(y2, bias, out):
    """y2 (O, N*P) -> out (N, O, P) = y2[o, n*P + p] + bias[o]  (bias of length O, or length 0)."""
    N, O, P = out.shape
    has_bias = bias.size > 0
    for n in range(N):
        for o in range(O):
            b = bias[o] if has_bias else out.dtype.type(0)
            for p in range(P):
                out[n, o, p] = y2[o, n * P + p] + b


@njit(**_jit_sums)
def conv_dy_kernel(dy, dy2, dbias):
    """dy (N, O, P) -> dy2 (O, N*P) (the GEMM layout) and dbias[o] = sum over n, p (length O or 0).

    The bias sum accumulates in float64."""
    N, O, P = dy.shape
    want_bias = dbias.size > 0
    acc = np.zeros(O if want_bias else 0, np.float64)
    for n in range(N):
        for o in range(O):
            s = 0.0
            for p in range(P):
                v = dy[n, o, p]
                dy2[o, n * P + p] = v
                s += v
            if want_bias:
                acc[o] += s
    for o in range(acc.size):
        dbias[o] = acc[o]


@njit(**_jit)
def leaky_relu_forward_kernel(x, slope, y, mask):
    """y = x if x > 0 else slope * x; mask = x > 0 (flat arrays; slope = 0 is ReLU)."""
    for i in range(x.size):
        v = x[i]
        pos = v > 0
        mask[i] = pos
        y[i] = v if pos else v * slope


@njit(**_jit)
def leaky_relu_backward_kernel(dy, mask, slope, dx):
    """dx = dy where mask else slope * dy (flat arrays)."""
    for i in range(dy.size):
        v = dy[i]
        dx[i] = v if mask[i] else v * slope


@njit(**_jit_sums)
def layer_norm_forward_kernel(x, eps, xhat, inv_std):
    """Rows of x (M, D): xhat = (x - mean) / sqrt(var + eps), inv_std (M,) = 1 / sqrt(var + eps).

    Two passes over each row (mean, then centred second moment, as ``np.var``), sums in float64."""
    M, D = x.shape
    for r in range(M):
        s = 0.0
        for d in range(D):
            s += x[r, d]
        mean = s / D
        q = 0.0
        for d in range(D):
            c = x[r, d] - mean
            q += c * c
        inv = 1.0 / np.sqrt(q / D + eps)
        inv_std[r] = inv
        mu, iv = x.dtype.type(mean), x.dtype.type(inv)
        for d in range(D):
            xhat[r, d] = (x[r, d] - mu) * iv


@njit(**_jit_sums)
def layer_norm_backward_kernel(dxhat, xhat, inv_std, dx):
    """dx = inv_std / D * (D dxhat - sum(dxhat) - xhat * sum(dxhat * xhat)) per row (M, D)."""
    M, D = dxhat.shape
    for r in range(M):
        s1 = 0.0
        s2 = 0.0
        for d in range(D):
            g = dxhat[r, d]
            s1 += g
            s2 += g * xhat[r, d]
        k = dxhat.dtype.type(inv_std[r] / D)
        a, b = dxhat.dtype.type(s1), dxhat.dtype.type(s2)
        n = dxhat.dtype.type(D)
        for d in range(D):
            dx[r, d] = k * (n * dxhat[r, d] - a - xhat[r, d] * b)


@njit(**_jit_sums)
def batch_norm_stats_kernel(x, mean, var):
    """x (N, C, P) -> per-channel mean and biased variance (float64; two passes, as ``np.var``)."""
    N, C, P = x.shape
    m = N * P
    for c in range(C):
        s = 0.0
        for n in range(N):
            for p in range(P):
                s += x[n, c, p]
        mu = s / m
        q = 0.0
        for n in range(N):
            for p in range(P):
                d = x[n, c, p] - mu
                q += d * d
        mean[c] = mu
        var[c] = q / m


@njit(**_jit)
def batch_norm_apply_kernel(x, mean, inv_std, gamma, beta, xhat, y):
    """xhat = (x - mean[c]) * inv_std[c]; y = gamma[c] * xhat + beta[c]  (x, xhat, y: (N, C, P))."""
    N, C, P = x.shape
    t = x.dtype.type
    for n in range(N):
        for c in range(C):
            mu, iv, g, b = t(mean[c]), t(inv_std[c]), gamma[c], beta[c]
            for p in range(P):
                h = (x[n, c, p] - mu) * iv
                xhat[n, c, p] = h
                y[n, c, p] = h * g + b


@njit(**_jit_sums)
def batch_norm_backward_kernel(dy, xhat, gamma, inv_std, batch, dx, dgamma, dbeta):
    """dgamma = sum dy xhat, dbeta = sum dy per channel (float64 sums); with batch statistics
    dx = gamma inv_std / m (m dy - dbeta - xhat dgamma), else (frozen) dx = gamma inv_std dy."""
    N, C, P = dy.shape
    m = N * P
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            for p in range(P):
                g = dy[n, c, p]
                s1 += g
                s2 += g * xhat[n, c, p]
        dgamma[c] = s2
        dbeta[c] = s1
        t = dy.dtype.type
        k = t(gamma[c] * inv_std[c])
        if batch:
            km, a, b, mm = t(gamma[c] * inv_std[c] / m), t(s1), t(s2), t(m)
            for n in range(N):
                for p in range(P):
                    dx[n, c, p] = km * (mm * dy[n, c, p] - a - xhat[n, c, p] * b)
        else:
            for n in range(N):
                for p in range(P):
                    dx[n, c, p] = k * dy[n, c, p]


@njit(**_jit)
def max_pool_forward_kernel(x, kh, kw, sh, sw, y, arg):
    """y[n, c, ho, wo] = max over the window, arg = its offset i*kw + j (the first on ties; a NaN
    in the window makes y NaN, as np.maximum, and keeps the offset of the last strict maximum).

    Offsets outside, output columns inside, with selects instead of branches: the wo loop
    vectorises and random data costs no branch mispredictions."""
    N, C, Ho, Wo = y.shape
    for n in range(N):
        for c in range(C):
            for ho in range(Ho):
                yr, ar = y[n, c, ho], arg[n, c, ho]
                x0 = x[n, c, ho * sh]
                for wo in range(Wo):
                    yr[wo] = x0[wo * sw]
                    ar[wo] = 0
                for i in range(kh):
                    xi = x[n, c, ho * sh + i]
                    for j in range(kw):
                        o = i * kw + j
                        if o == 0:
                            continue
                        for wo in range(Wo):
                            v, best = xi[wo * sw + j], yr[wo]
                            gt = v > best
                            ar[wo] = o if gt else ar[wo]
                            yr[wo] = v if (gt or v != v) else best


@njit(**_jit)
def max_pool_backward_kernel(dy, arg, kw, sh, sw, dx):
    """dx = 0, then each dy goes to its window's argmax: dx[n, c, ho*sh + i, wo*sw + j] += dy."""
    N, C, Ho, Wo = dy.shape
    dx[...] = 0
    for n in range(N):
        for c in range(C):
            for ho in range(Ho):
                for wo in range(Wo):
                    a = arg[n, c, ho, wo]
                    dx[n, c, ho * sh + a // kw, wo * sw + a % kw] += dy[n, c, ho, wo]
