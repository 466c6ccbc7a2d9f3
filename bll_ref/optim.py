"""Optimisers: SGD with momentum, Adam.

An optimiser holds a layer (a block, or a whole model) and, on ``step()``, reads ``layer.grads``
and updates ``layer.params`` in place. Under BLL every block owns one optimiser, so blocks update
independently. Defaults follow the original papers (Adam: Kingma & Ba 2015, Algorithm 1).
"""
from __future__ import annotations

import inspect
import math

import numpy as np
from numba import njit

from . import backend

__all__ = ["SGD", "Adam", "make_optimizer", "adam_update_reference", "sgd_update_reference"]

# On the GPU the same optimisers run numba.cuda twins of the three kernels below
# (``bll_ref/gpu/optim_kernels.py``: adam, sgd, sgd_plain, same arguments), chosen by the array type.


def adam_update_reference(p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """NumPy twin of the fused kernel (the specification). Updates p, m, v in place.

    L2 weight decay is coupled (g + wd p, as torch.optim.Adam), bias correction at step t >= 1.
    """
    if weight_decay:
        g = g + weight_decay * p
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
    p -= (lr / c1) * m / (np.sqrt(v / c2) + eps)


# Kernel flags: nogil so block learners step their optimisers in parallel threads; error_model="numpy"
# drops the per-element ZeroDivisionError branch that stops LLVM from vectorising; fastmath without
# nnan/ninf (a diverging run must still produce inf/NaN that the fit loop detects) lets it contract,
# reassociate and use reciprocals. Serial: a prange version would compete with BLAS and pipeline
# worker threads for the cores. The scalars arrive in the parameters' dtype, so a float32 update
# runs in float32 SIMD lanes (8 per AVX2 register) with no float64 per element.
_KERNEL_FLAGS = dict(cache=True, nogil=True, error_model="numpy",
                     fastmath={"contract", "arcp", "afn", "reassoc", "nsz"})


@njit(**_KERNEL_FLAGS)
def _adam_kernel(p, g, m, v, step, beta1, one_m_beta1, beta2, one_m_beta2, inv_sqrt_c2, eps, weight_decay):
    # One pass over flat contiguous arrays instead of ~10 NumPy passes (the update is memory-bound:
    # 7 words per parameter). step = lr / c1, inv_sqrt_c2 = 1 / sqrt(c2): sqrt(v / c2) = sqrt(v) / sqrt(c2).
    for i in range(p.size):
        gi = g[i] + weight_decay * p[i]
        mi = beta1 * m[i] + one_m_beta1 * gi
        vi = beta2 * v[i] + one_m_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= step * mi / (math.sqrt(vi) * inv_sqrt_c2 + eps)


@njit(**_KERNEL_FLAGS)
def _sgd_kernel(p, g, velocity, lr, momentum, weight_decay):
    # v = momentum v + (g + wd p); p -= lr v   (momentum 0 reduces to plain SGD; 5 words per parameter)
    for i in range(p.size):
        vi = momentum * velocity[i] + g[i] + weight_decay * p[i]
        velocity[i] = vi
        p[i] -= lr * vi


@njit(**_KERNEL_FLAGS)
def _sgd_plain_kernel(p, g, lr, weight_decay):
    for i in range(p.size):
        p[i] -= lr * (g[i] + weight_decay * p[i])


def sgd_update_reference(p, g, velocity, lr, momentum, weight_decay):
    """NumPy twin of the fused SGD kernels (PyTorch's convention, dampening 0). Updates in place."""
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        velocity *= momentum
        velocity += g
        g = velocity
    p -= p.dtype.type(lr) * g


def _flat(a, name):
    if not a.flags.c_contiguous:
        raise ValueError(f"optimiser needs C-contiguous parameter {name!r}")
    return a.reshape(-1)


def _flat_grad(g, p):
    """The gradient as a flat C-contiguous array of the parameter's dtype (a copy only if it is not)."""
    return backend.array_module(g).ascontiguousarray(g, dtype=p.dtype).reshape(-1)


def _copy_into(dst, src):
    """Copy a state array (host or device) into ``dst`` in place, on dst's device."""
    if backend.is_device_array(dst):
        dst[...] = backend.array_module(dst).asarray(backend.asnumpy(src))
    else:
        np.copyto(dst, backend.asnumpy(src))


def _zeros_like(p):
    return backend.array_module(p).zeros(p.shape, p.dtype)  # (np.zeros: pages on first write)


class _Optimizer:
    def __init__(self, layer, lr):
        if not hasattr(layer, "params") or not hasattr(layer, "grads"):
            raise ValueError(f"optimiser expects a layer with params/grads, got {type(layer).__name__}")
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.layer, self.lr, self.t = layer, float(lr), 0
        self._params = layer.params  # same arrays as the layer's: updated in place

    def _grads(self):
        grads = self.layer.grads
        missing = [k for k in self._params if k not in grads]
        if missing:
            raise RuntimeError(f"no gradient for {missing[:4]}: call backward before step()")
        for k, p in self._params.items():
            if grads[k].shape != p.shape:
                raise RuntimeError(f"gradient {k} has shape {grads[k].shape}, parameter {p.shape}")
        return grads

    def _pieces(self, grads, part):
        """(name, flat parameter piece, flat gradient piece, cut) to update, ``cut`` the slice of
        the flattened arrays (the state's too): every parameter whole, or with ``part``
        ({name: (lo, hi)}) elements lo:hi of the parameters it names, an MPI replica's share of a
        step (bll_ref/parallel/slices.py, ``shard_parts``). The update is elementwise, so the
        pieces of all replicas together make the whole step, bit for bit."""
        for k, p in self._params.items():
            cut = slice(0, p.size) if part is None else slice(*part.get(k, (0, 0)))
            if cut.stop > cut.start:
                yield k, _flat(p, k)[cut], grads[k].reshape(-1)[cut], cut

    def state_dict(self) -> dict:
        return {"t": np.array(self.t), "lr": np.array(self.lr)}

    def load_state_dict(self, state):
        self.t, self.lr = int(state["t"]), float(state["lr"])

    def _kernels(self, p):
        """The fused update kernels for ``p``: this module's Numba ones, or the GPU twins."""
        return backend.gpu_module("optim_kernels") if backend.is_device_array(p) else None

    _STATE = ()  # names of the per-parameter state dicts (moved by ``to``)

    def to(self, device):
        """Follow the layer to ``device`` (call after ``layer.to(device)``): re-read its
        parameter arrays and move the per-parameter state. Returns self."""
        self._params = self.layer.params
        for name in self._STATE:
            d = getattr(self, name)
            for k in d:
                d[k] = backend.to_device(d[k], device)
        return self


class SGD(_Optimizer):
    """p -= lr * (v = momentum v + g + wd p)  (PyTorch's SGD convention, dampening 0).

    ``fused=True`` uses the Numba kernels; ``fused=False`` the NumPy twin (the specification)."""

    def __init__(self, layer, lr=0.01, momentum=0.0, weight_decay=0.0, fused=True):
        super().__init__(layer, lr)
        self.momentum, self.weight_decay, self.fused = float(momentum), float(weight_decay), bool(fused)
        self.velocity = {k: _zeros_like(p) for k, p in self._params.items()}

    _STATE = ("velocity",)

    def step(self, part=None):
        grads = self._grads()
        self.t += 1
        for k, p, g, cut in self._pieces(grads, part):
            vel = self.velocity[k].reshape(-1)[cut]
            if not self.fused:
                sgd_update_reference(p, g, vel, self.lr, self.momentum, self.weight_decay)
                continue
            f = p.dtype.type  # scalars in the parameter's dtype: no float64 per element for float32
            gpu = self._kernels(p)
            if self.momentum:
                (gpu.sgd if gpu else _sgd_kernel)(p, _flat_grad(g, p), vel, f(self.lr), f(self.momentum),
                                                   f(self.weight_decay))
            else:
                (gpu.sgd_plain if gpu else _sgd_plain_kernel)(p, _flat_grad(g, p), f(self.lr), f(self.weight_decay))

    def state_dict(self):
        return {**super().state_dict(), **{f"velocity/{k}": backend.asnumpy(v) for k, v in self.velocity.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for k, v in self.velocity.items():
            _copy_into(v, state[f"velocity/{k}"])


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015; defaults from the paper). ``fused=True`` uses the Numba kernel."""

    def __init__(self, layer, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True):
        super().__init__(layer, lr)
        self.beta1, self.beta2 = map(float, betas)
        self.eps, self.weight_decay, self.fused = float(eps), float(weight_decay), bool(fused)
        self.m = {k: _zeros_like(p) for k, p in self._params.items()}
        self.v = {k: _zeros_like(p) for k, p in self._params.items()}

    _STATE = ("m", "v")

    def step(self, part=None):
        grads = self._grads()
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for k, p, g, cut in self._pieces(grads, part):
            m, v = self.m[k].reshape(-1)[cut], self.v[k].reshape(-1)[cut]
            if not self.fused:
                adam_update_reference(p, g.astype(p.dtype, copy=False), m, v, self.lr,
                                      self.beta1, self.beta2, self.eps, self.weight_decay, self.t)
                continue
            f = p.dtype.type  # scalars precomputed once per step, in the parameter's dtype
            gpu = self._kernels(p)
            (gpu.adam if gpu else _adam_kernel)(p, _flat_grad(g, p), m, v,
                         f(self.lr / c1), f(self.beta1), f(1 - self.beta1), f(self.beta2), f(1 - self.beta2),
                         f(1 / math.sqrt(c2)), f(self.eps), f(self.weight_decay))

    def state_dict(self):
        out = super().state_dict()
        out.update({f"m/{k}": backend.asnumpy(v) for k, v in self.m.items()})
        out.update({f"v/{k}": backend.asnumpy(v) for k, v in self.v.items()})
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for k in self.m:
            _copy_into(self.m[k], state[f"m/{k}"])
            _copy_into(self.v[k], state[f"v/{k}"])


def make_optimizer(name, layer, lr, **kw):
    """``"adam"`` or ``"sgd"`` -> optimiser over ``layer``."""
    kinds = {"adam": Adam, "sgd": SGD}
    if name not in kinds:
        raise ValueError(f"unknown optimiser {name!r}; choose from {sorted(kinds)}")
    known = set(inspect.signature(kinds[name]).parameters) - {"layer", "lr"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"optimiser {name!r} takes no {', '.join(unknown)} (it takes {', '.join(sorted(known))})")
    return kinds[name](layer, lr=lr, **kw)
