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

__all__ = ["SGD", "Adam", "make_optimizer", "adam_update_reference"]


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


@njit(cache=True, nogil=True)  # nogil: block learners step their optimisers in parallel threads
def _adam_kernel(p, g, m, v, lr, beta1, beta2, eps, weight_decay, c1, c2):
    # One pass over flat contiguous arrays instead of ~10 NumPy passes (the update is memory-bound).
    # Serial: a prange version would compete with BLAS and pipeline worker threads for the cores.
    for i in range(p.size):
        gi = g[i] + weight_decay * p[i]
        mi = beta1 * m[i] + (1 - beta1) * gi
        vi = beta2 * v[i] + (1 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= (lr / c1) * mi / (math.sqrt(vi / c2) + eps)


def _flat(a, name):
    if not a.flags.c_contiguous:
        raise ValueError(f"optimiser needs C-contiguous parameter {name!r}")
    return a.reshape(-1)


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

    def state_dict(self) -> dict:
        return {"t": np.array(self.t), "lr": np.array(self.lr)}

    def load_state_dict(self, state):
        self.t, self.lr = int(state["t"]), float(state["lr"])


class SGD(_Optimizer):
    """p -= lr * (v = momentum v + g + wd p)  (PyTorch's SGD convention, dampening 0)."""

    def __init__(self, layer, lr=0.01, momentum=0.0, weight_decay=0.0):
        super().__init__(layer, lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.velocity = {k: np.zeros_like(p) for k, p in self._params.items()}

    def step(self):
        grads = self._grads()
        self.t += 1
        for k, p in self._params.items():
            g = grads[k] + self.weight_decay * p if self.weight_decay else grads[k]
            if self.momentum:
                v = self.velocity[k]
                v *= self.momentum
                v += g
                g = v
            p -= p.dtype.type(self.lr) * g

    def state_dict(self):
        return {**super().state_dict(), **{f"velocity/{k}": v for k, v in self.velocity.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for k, v in self.velocity.items():
            np.copyto(v, state[f"velocity/{k}"])


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015; defaults from the paper). ``fused=True`` uses the Numba kernel."""

    def __init__(self, layer, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True):
        super().__init__(layer, lr)
        self.beta1, self.beta2 = map(float, betas)
        self.eps, self.weight_decay, self.fused = float(eps), float(weight_decay), bool(fused)
        self.m = {k: np.zeros_like(p) for k, p in self._params.items()}
        self.v = {k: np.zeros_like(p) for k, p in self._params.items()}

    def step(self):
        grads = self._grads()
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for k, p in self._params.items():
            g = grads[k].astype(p.dtype, copy=False)
            if self.fused:
                _adam_kernel(_flat(p, k), np.ascontiguousarray(g).reshape(-1), self.m[k].reshape(-1),
                             self.v[k].reshape(-1), self.lr, self.beta1, self.beta2, self.eps,
                             self.weight_decay, c1, c2)
            else:
                adam_update_reference(p, g, self.m[k], self.v[k], self.lr, self.beta1, self.beta2,
                                      self.eps, self.weight_decay, self.t)

    def state_dict(self):
        out = super().state_dict()
        out.update({f"m/{k}": v for k, v in self.m.items()})
        out.update({f"v/{k}": v for k, v in self.v.items()})
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for k in self.m:
            np.copyto(self.m[k], state[f"m/{k}"])
            np.copyto(self.v[k], state[f"v/{k}"])


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
