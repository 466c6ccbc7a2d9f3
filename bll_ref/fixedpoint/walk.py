"""The one walk over a float model, shared by :func:`~bll_ref.fixedpoint.compile_integer` and
``exporters.nir``: nested Sequentials flattened, each BatchNorm folded into the Dense / Conv2d
right before it, a BatchNorm elsewhere turned into a per-channel affine map, a Residual turned into
its body and shortcut paths plus a junction that sums them.

Steps are named by layer path: ``"1.0"`` = block 1 layer 0, ``"0.0+0.1"`` = Dense/Conv2d 0.0 with
BatchNorm 0.1 folded in, ``"2.1"`` = the junction of Residual 2.1, ``"2.1.body.0"`` = a layer
inside it.  Step k of :func:`walk` reads the outputs of ``inputs`` (0 = the model input, j >= 1 =
step j), so a consumer that makes one node per step can index its nodes the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import layers as L

__all__ = ["fold_batchnorm", "bn_affine", "walk", "Affine", "ChannelAffine", "Junction", "Op"]


def fold_batchnorm(W, c, gamma, beta, running_mean, running_var, eps):
    """Fold eval-mode BatchNorm into the preceding Dense / Conv2d float weights.

    BN(z) = gamma (z - mean) / sqrt(var + eps) + beta with z = x W + c, so with
    s = gamma / sqrt(var + eps):  W' = W * s (per output channel),  c' = (c - mean) s + beta.

    Parameters
    ----------
    W : (in, out) Dense weights or (out, in, kh, kw) Conv2d weights
    c : (out,) bias or None (no bias)
    gamma, beta, running_mean, running_var : (out,)
    eps : float

    Returns
    -------
    W', c' : float64 arrays of the shapes of W and (out,)
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim == 2:
        out_axis = 1
    elif W.ndim == 4:
        out_axis = 0
    else:
        raise ValueError(f"fold_batchnorm expects Dense W (in, out) or Conv2d W (out, in, kh, kw), got {W.shape}")
    n = W.shape[out_axis]
    vecs = [np.asarray(v, dtype=np.float64) for v in (gamma, beta, running_mean, running_var)]
    for name, v in zip(("gamma", "beta", "running_mean", "running_var"), vecs):
        if v.shape != (n,):
            raise ValueError(f"fold_batchnorm: {name} must have shape ({n},), got {v.shape}")
    gamma, beta, mean, var = vecs
    c = np.zeros(n) if c is None else np.asarray(c, dtype=np.float64)
    if c.shape != (n,):
        raise ValueError(f"fold_batchnorm: bias must have shape ({n},), got {c.shape}")
    s = gamma / np.sqrt(var + float(eps))
    shape = [1] * W.ndim
    shape[out_axis] = n
    return W * s.reshape(shape), (c - mean) * s + beta


def _fold(W, c, bn):
    n = c.shape[0]
    return fold_batchnorm(W, c, bn.params.get("gamma", np.ones(n)), bn.params.get("beta", np.zeros(n)),
                          bn.buffers["running_mean"], bn.buffers["running_var"], bn.eps)


def bn_affine(bn):
    """Eval-mode BatchNorm as per-channel y = s x + t; returns float64 (s, t), each (C,)."""
    n = bn.buffers["running_mean"].shape[0]
    s, t = _fold(np.eye(n), np.zeros(n), bn)
    return np.diag(s).copy(), t


@dataclass(frozen=True, eq=False)
class _Step:
    name: str
    inputs: tuple
    layer: Any


@dataclass(frozen=True, eq=False)
class Affine(_Step):
    """Dense or Conv2d ``layer`` (with BatchNorm ``bn`` folded in when not None): float64 ``W``
    of the layer's shape and ``c`` (out,), zeros when the layer has no bias."""
    W: np.ndarray
    c: np.ndarray
    bn: Any


@dataclass(frozen=True, eq=False)
class ChannelAffine(_Step):
    """A BatchNorm not after a Dense / Conv2d: y = s x + t per channel (axis 1), float64."""
    s: np.ndarray
    t: np.ndarray


@dataclass(frozen=True, eq=False)
class Junction(_Step):
    """The Residual ``layer``: y = body + shortcut, inputs = (body output, shortcut output)."""


@dataclass(frozen=True, eq=False)
class Op(_Step):
    """Any other layer, applied as it is (ReLU, pooling, Flatten, ...)."""


def _items(layer, path):
    """Flatten nested Sequentials into [(path, layer)]."""
    if isinstance(layer, L.Sequential):
        out = []
        for i, child in enumerate(layer.layers):
            out += _items(child, f"{path}.{i}" if path else str(i))
        return out
    return [(path, layer)]


def _affine(name, layer, bn, src):
    W = np.asarray(layer.params["W"], dtype=np.float64)
    c = layer.params.get("c")
    c = np.zeros(W.shape[1] if W.ndim == 2 else W.shape[0]) if c is None else np.asarray(c, np.float64)
    if bn is not None:
        W, c = _fold(W, c, bn)
    return Affine(name, (src,), layer, W, c, bn)


class _Walker:
    def __init__(self):
        self.n = 0                               # steps yielded so far = index of the last one

    def emit(self, step):
        self.n += 1
        yield step
        return self.n

    def sequence(self, items, src):
        i = 0
        while i < len(items):
            path, layer = items[i]
            nxt = items[i + 1] if i + 1 < len(items) else (None, None)
            if isinstance(layer, (L.Dense, L.Conv2d)) and isinstance(nxt[1], L.BatchNorm):
                src = yield from self.emit(_affine(f"{path}+{nxt[0]}", layer, nxt[1], src))
                i += 2
            else:
                src = yield from self.layer(path, layer, src)
                i += 1
        return src

    def layer(self, name, layer, src):
        if isinstance(layer, (L.Dense, L.Conv2d)):
            return (yield from self.emit(_affine(name, layer, None, src)))
        if isinstance(layer, L.BatchNorm):
            return (yield from self.emit(ChannelAffine(name, (src,), layer, *bn_affine(layer))))
        if isinstance(layer, L.Residual):
            body = yield from self.sequence(_items(layer.body, f"{name}.body"), src)
            sc = src if layer.shortcut is None else (
                yield from self.sequence(_items(layer.shortcut, f"{name}.shortcut"), src))
            return (yield from self.emit(Junction(name, (body, sc), layer)))
        return (yield from self.emit(Op(name, (src,), layer)))


def walk(model):
    """Yield the steps of ``model`` (a Layer, usually a Sequential of blocks) in order.

    Lazy: each step (and its BatchNorm folding) is made when the consumer asks for it, so a
    consumer's error about an earlier layer comes before any error about a later one.
    """
    root = _items(model, "") if isinstance(model, L.Sequential) else [("0", model)]
    yield from _Walker().sequence(root, 0)
