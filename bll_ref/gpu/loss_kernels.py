"""numba.cuda device code of ``bll_ref.losses.cuda``: the six local-estimator kernels (Eq. 7 / S8,
Eq. 8/9, S12, S13), the softmax cross-entropy of the output layer and their reduction.
``bll_ref.losses.cuda`` validates the arrays, allocates the outputs and launches these through
:data:`LAUNCHERS`; ``losses/local.py`` / ``losses/output.py`` are their specification.

Every element is computed in float64 (the loss terms are summed in float64) and the gradients
are stored in the output dtype; Bernoulli and Poisson gradients below ``tiny`` (the smallest
normal number of that dtype) are written as 0, Gaussian ones are left alone.

Reduction (deterministic, no float atomics; one launch): the caller runs a fixed grid of at most
``MAX_BLOCKS`` blocks of :data:`THREADS` threads; each thread walks the array with a grid stride
and sums its loss terms, each block tree-reduces its threads' sums in shared memory and writes
one float64 partial. The last block to finish (each block's thread 0 fences its partial, then
takes a ticket from an int32 counter with an integer atomic add; the block holding ticket
grid - 1 is the last) adds the partials in a fixed order (thread t: partials t, t + THREADS, ...,
then the tree), scales by 1/N into the loss and resets the counter to 0 for the next launch.
Which block comes last varies, the order of the sum does not: two runs give the same bits, equal
to a separate partial-sum launch (``_sum_partials_kernel``, which the tests compare it with).

Kernels take raw device pointers (``CPointer`` parameters, the element count passed explicitly),
are compiled once per dtype for an explicit signature and launched through
:class:`bll_ref.gpu.launch.KernelLauncher` (``bll_ref.gpu.launch`` says why); the simulator runs
the same bodies on flat numba arrays (a pointer indexes like a flat array). Device helpers are
``inline="always"`` (compiling a separate device function for PTX would initialise the driver)
and use conditional expressions instead of the builtin ``max`` / ``min``, which NVVM rejects.

Importing this module never needs a GPU (kernels compile on first use); ``PTX_SIGNATURES``
lists every kernel with the signatures it is compiled for (the tests compile each to PTX).
"""
from __future__ import annotations

import math

from .launch import KernelLauncher, load_cg, pointer_signatures, ticket

try:  # numba.cuda imports without a GPU or toolkit; guard anyway (stripped-down numba builds)
    import numba
    from numba import cuda, types
except Exception:  # pragma: no cover - depends on the numba build (launch.IMPORT_ERROR says why)
    cuda, types = None, None

__all__ = ["THREADS", "PTX_SIGNATURES", "LAUNCHERS"]

#: Threads per block (a power of two: the shared-memory tree halves it).
THREADS = 256

if cuda is not None:
    _f64, _i64, _P64, _P32 = types.float64, types.int64, types.CPointer(types.float64), types.CPointer(types.int32)

    @cuda.jit(device=True, inline="always")
    def _block_reduce(term, out, i):
        """Tree-reduce one float64 per thread in shared memory; thread 0 writes the block's sum
        to out[i]. The block must have THREADS threads."""
        sm = cuda.shared.array(THREADS, numba.float64)
        t = cuda.threadIdx.x
        sm[t] = term
        cuda.syncthreads()
        s = THREADS // 2
        while s > 0:
            if t < s:
                sm[t] += sm[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            out[i] = sm[0]

    @cuda.jit(device=True, inline="always")
    def _sum_partials(partial, n_partials, inv_n, loss):
        """One block of THREADS: thread t adds partial[t], partial[t + THREADS], ... in order,
        then the tree; loss[0] = the sum times inv_n (a fixed order: deterministic)."""
        t = cuda.threadIdx.x
        term = 0.0
        k = t
        while k < n_partials:
            term += load_cg(partial, k)
            k += THREADS
        _block_reduce(term * inv_n, loss, 0)

    @cuda.jit
    def _sum_partials_kernel(partial, n_partials, inv_n, loss):
        """The last block's sum (``_finish``) as a launch of its own (one block): the two-launch
        form the tests compare the one-launch kernels with."""
        _sum_partials(partial, n_partials, inv_n, loss)

    @cuda.jit(device=True, inline="always")
    def _finish(acc, partial, counter, inv_n, loss):
        """End of every reducing kernel: the block's sum of acc into partial[blockIdx.x]; the last
        block to get here then sums all partials into loss[0] and resets counter[0] to 0."""
        _block_reduce(acc, partial, cuda.blockIdx.x)
        last = cuda.shared.array(1, numba.int32)
        if cuda.threadIdx.x == 0:
            cuda.threadfence()     # this block's partial is visible to all before its ticket
            last[0] = 1 if ticket(counter) == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if last[0] != 0:
            cuda.threadfence()     # and every other block's partial before this block reads them
            _sum_partials(partial, cuda.gridDim.x, inv_n, loss)
            if cuda.threadIdx.x == 0:
                counter[0] = 0

    @cuda.jit(device=True, inline="always")
    def _ftz(v, tiny):
        """v, or 0 where |v| is below the smallest normal number of the output dtype."""
        return v if abs(v) >= tiny else 0.0

    @cuda.jit(device=True, inline="always")
    def _relu(x):
        return x if x > 0.0 else 0.0  # not max(x, 0.0): NVVM rejects the builtin (numba-cuda 0.30.4)

    @cuda.jit(device=True, inline="always")
    def _sigmoid_parts(x, e):
        """(S(x), S(x) S(-x), 1 / (1 + e)) given e = e^{-|x|}: the Bernoulli mu and var (Eq. S9)."""
        r = 1.0 / (1.0 + e)
        return (1.0 if x >= 0.0 else e) * r, e * r * r, r

    @cuda.jit(device=True, inline="always")
    def _bernoulli_kl(x, g, mu_g, e_x, e_g, r_g):
        """A(x) - A(g) - mu(g) (x - g) (Eq. S7); the softplus difference in one log1p:
        log1p(e_x) - log1p(e_g) = log1p((e_x - e_g) / (1 + e_g)), argument in [-1/2, 1]."""
        return (_relu(x) - _relu(g)) + math.log1p((e_x - e_g) * r_g) - mu_g * (x - g)

    @cuda.jit(device=True, inline="always")
    def _clip_exp(x, eta_max):
        """e^min(x, eta_max): the clipped Poisson mean (expfam.Poisson)."""
        return math.exp(x if x < eta_max else eta_max)

    # Every elementwise loss kernel: (x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss).
    # x, y: inputs (phi, gamma) or (a, b); m: mixing (Eq. 9); p: s2 (Gaussian) or eta_max
    # (Poisson); inv_n = 1/N; tiny: the flush threshold of the output dtype; n: element count;
    # o1, o2: the two gradients; partial: one float64 loss sum per block; counter: int32 ticket
    # counter (0 before and after a launch); loss: (1,) float64, the mean loss.

    @cuda.jit
    def _bernoulli_kl_ef_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            phi = numba.float64(x[k])
            gam = numba.float64(y[k])
            e_x = math.exp(-abs(phi))
            e_y = math.exp(-abs(gam))
            mu_p, var_p, r_p = _sigmoid_parts(phi, e_x)
            mu_g, var_g, r_g = _sigmoid_parts(gam, e_y)
            o1[k] = _ftz(-(mu_g - mu_p) * inv_n, tiny)          # Eq. 7 forward weight
            o2[k] = _ftz(var_g * (gam - phi) * inv_n, tiny)     # Eq. 7 posterior weight
            acc += _bernoulli_kl(phi, gam, mu_g, e_x, e_y, r_g)
            k += stride
        _finish(acc, partial, counter, inv_n, loss)

    @cuda.jit
    def _gaussian_kl_ef_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        h = 0.5 * p
        acc = 0.0
        while k < n:
            phi = numba.float64(x[k])
            gam = numba.float64(y[k])
            mu_g = p * gam
            o1[k] = -(mu_g - p * phi) * inv_n                   # Eq. 7 forward weight
            o2[k] = p * (gam - phi) * inv_n                     # Eq. 7 posterior weight
            acc += h * (phi * phi) - h * (gam * gam) - mu_g * (phi - gam)   # Eq. S7
            k += stride
        _finish(acc, partial, counter, inv_n, loss)

    @cuda.jit
    def _poisson_kl_ef_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            phi = numba.float64(x[k])
            gam = numba.float64(y[k])
            e_p = _clip_exp(phi, p)
            e_g = _clip_exp(gam, p)
            o1[k] = _ftz(-(e_g - e_p) * inv_n, tiny)
            o2[k] = _ftz(e_g * (gam - phi) * inv_n, tiny)
            acc += e_p - e_g - e_g * (phi - gam)
            k += stride
        _finish(acc, partial, counter, inv_n, loss)

    @cuda.jit
    def _bernoulli_eq8_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            a = numba.float64(x[k])
            b = numba.float64(y[k])
            g = a + m * b                                       # Eq. 9
            e_a = math.exp(-abs(a))
            e_g = math.exp(-abs(g))
            alpha, var_a, r_a = _sigmoid_parts(a, e_a)
            rho, var_g, r_g = _sigmoid_parts(g, e_g)
            post = var_g * b                                    # Eq. 8 posterior weight rho(1-rho) b
            o1[k] = _ftz((-(rho - alpha) + post) * inv_n, tiny)  # Eq. 8 forward weight (rho - alpha)
            o2[k] = _ftz(post * inv_n, tiny)
            acc += _bernoulli_kl(a, g, rho, e_a, e_g, r_g)
            k += stride
        _finish(acc, partial, counter, inv_n, loss)

    @cuda.jit
    def _gaussian_s12_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        h = 0.5 * p
        acc = 0.0
        while k < n:
            a = numba.float64(x[k])
            b = numba.float64(y[k])
            g = a + m * b
            mu_g = p * g
            post = p * b                                        # S12 posterior weight sigma^2 b
            o1[k] = (-(mu_g - p * a) + post) * inv_n            # S11 forward weight s2 (gamma - phi)
            o2[k] = post * inv_n
            acc += h * (a * a) - h * (g * g) - mu_g * (a - g)
            k += stride
        _finish(acc, partial, counter, inv_n, loss)

    @cuda.jit
    def _poisson_s13_kernel(x, y, m, p, inv_n, tiny, n, o1, o2, partial, counter, loss):
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while k < n:
            a = numba.float64(x[k])
            b = numba.float64(y[k])
            g = a + m * b
            alpha = _clip_exp(a, p)
            rho = _clip_exp(g, p)
            post = rho * b                                      # S13 posterior weight rho b
            o1[k] = _ftz((-(rho - alpha) + post) * inv_n, tiny)
            o2[k] = _ftz(post * inv_n, tiny)
            acc += alpha - rho - rho * (a - g)
            k += stride
        _finish(acc, partial, counter, inv_n, loss)

    @cuda.jit
    def _softmax_ce_kernel(z, labels, n_rows, c, inv_n, dz, partial, counter, loss):
        """One thread per row of z (n_rows, c), grid stride: dz = (softmax - onehot) * inv_n,
        the row's -log softmax[label] summed per block. A label outside [0, c) makes its row's
        gradient and the loss NaN (a device kernel cannot raise)."""
        r = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = 0.0
        while r < n_rows:
            base = r * c
            zmax = numba.float64(z[base])
            for j in range(1, c):
                zj = numba.float64(z[base + j])
                zmax = zj if zj > zmax else zmax
            s = 0.0
            for j in range(c):
                s += math.exp(numba.float64(z[base + j]) - zmax)
            lse = math.log(s)                                   # log-sum-exp of the shifted row
            y = numba.int64(labels[r])
            ok = y >= 0 and y < c
            for j in range(c):
                pj = math.exp((numba.float64(z[base + j]) - zmax) - lse)
                if j == y:
                    pj -= 1.0
                dz[base + j] = (pj if ok else math.nan) * inv_n
            if ok:
                acc -= (numba.float64(z[base + y]) - zmax) - lse
            else:
                acc += math.nan
            r += stride
        _finish(acc, partial, counter, inv_n, loss)

    _ELEMENTWISE_SIG = pointer_signatures("dt*", "dt*", _f64, _f64, _f64, _f64, _i64, "dt*", "dt*", _P64, _P32, _P64)

    #: Every kernel of this module and the signatures it is compiled for (keys: dtype names;
    #: for the softmax, logits dtype + label dtype). The tests compile each to PTX.
    PTX_SIGNATURES = {
        "_bernoulli_kl_ef_kernel": _ELEMENTWISE_SIG,
        "_gaussian_kl_ef_kernel": _ELEMENTWISE_SIG,
        "_poisson_kl_ef_kernel": _ELEMENTWISE_SIG,
        "_bernoulli_eq8_kernel": _ELEMENTWISE_SIG,
        "_gaussian_s12_kernel": _ELEMENTWISE_SIG,
        "_poisson_s13_kernel": _ELEMENTWISE_SIG,
        "_sum_partials_kernel": {"float64": (_P64, _i64, _f64, _P64)},
        "_softmax_ce_kernel": {
            f"{zt}_{lt}": (types.CPointer(getattr(types, zt)), types.CPointer(getattr(types, lt)), _i64, _i64,
                           _f64, types.CPointer(getattr(types, zt)), _P64, _P32, _P64)
            for zt in ("float32", "float64") for lt in ("int32", "int64")},
    }
    #: One :class:`~bll_ref.gpu.launch.KernelLauncher` per kernel, by the kernel's name.
    LAUNCHERS = {name: KernelLauncher(globals()[name], sigs) for name, sigs in PTX_SIGNATURES.items()}
else:  # pragma: no cover - no numba.cuda
    PTX_SIGNATURES = {}
    LAUNCHERS = {}
