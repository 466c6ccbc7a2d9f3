"""Central finite-difference checks of hand-written backward passes (float64).

The scalar checked is L = sum(y * dy) with a random upstream ``dy`` (never all ones, which would
hide a transposed gradient), so dL/dx = layer.backward(dy).
"""
from __future__ import annotations

import numpy as np

__all__ = ["check_layer", "numeric_gradient", "rel_error"]


def rel_error(a, b) -> float:
    """``max |a - b| / max(max |a|, max |b|, 1e-12)``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-12)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def numeric_gradient(f, x, eps=1e-6):
    """Central differences of the scalar function ``f()`` w.r.t. the array ``x`` (perturbed in place)."""
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def check_layer(layer, x, rng=None, eps=1e-6, forward_kwargs=None):
    """Relative errors of dx and of every parameter gradient against central differences.

    Returns dict name -> relative error ('x' for the input). ``x`` must be float64 (integer inputs,
    e.g. token ids, skip the 'x' check).
    """
    rng = np.random.default_rng(rng)
    kw = dict(train=True, **(forward_kwargs or {}))
    y = layer.forward(x, **kw)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    analytic = {k: v.copy() for k, v in layer.grads.items()}

    def loss():
        return float(np.sum(layer.forward(x, **kw) * dy))

    errors = {}
    if np.issubdtype(x.dtype, np.floating):
        errors["x"] = rel_error(dx, numeric_gradient(loss, x, eps))
    for name, p in layer.params.items():
        errors[name] = rel_error(analytic[name], numeric_gradient(loss, p, eps))
    return errors
