"""Feedback networks: carry label information back to each block as b_k (the beta messages).

* ``LinearFeedback`` — b = Y W (+ e): a linear map from the one-hot label to a block's units,
  solved in closed form (ridge least squares). Paper 003: with a linear feedback network the
  local loss is convex in the feedback weights, so the optimum is available per mini-batch.
* ``TrainedLinearFeedback`` — the same map trained by gradient descent on the second term of
  Eq. 8 (g_b), as in the main paper.
* ``TwinFeedback`` — the paper's deep backward network: the forward blocks mirrored, from the
  label at the top down to block 1, every layer trained locally by its block's g_b.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from . import backend
from .layers import Dense, Sequential, Tanh
from .layers.base import as_rng, load_state_dict
from .optim import make_optimizer

__all__ = ["LinearFeedback", "TrainedLinearFeedback", "TwinFeedback"]


def _check_ya(Y, A, n_classes, n_units):
    if Y.ndim != 2 or Y.shape[1] != n_classes:
        raise ValueError(f"feedback expects Y of shape (N, {n_classes}), got {Y.shape}")
    if A.ndim != 2 or A.shape != (Y.shape[0], n_units):
        raise ValueError(f"feedback expects A of shape ({Y.shape[0]}, {n_units}), got {A.shape}")


class LinearFeedback:
    """Closed-form ridge feedback: W = argmin ||Y W - A||^2 + l2 ||W||^2 = (YᵀY + l2 I)⁻¹ YᵀA.

    Parameters
    ----------
    n_classes, n_units : int
    l2 : float > 0
        Ridge strength; keeps the solve well posed when a class is missing from the batch.
    decay : float in [0, 1) or None
        None: solve on the current batch only. Otherwise keep running sufficient statistics
        S_yy <- decay S_yy + YᵀY, S_ya <- decay S_ya + YᵀA and solve on them (spans many batches).

    Notes
    -----
    Shapes: Y (N, n_classes) one-hot (or soft) labels, A (N, n_units); W (n_classes[+1], n_units).
    """

    def __init__(self, n_classes, n_units, *, l2=1.0, decay=None, dtype=np.float32):
        if not l2 > 0:
            raise ValueError(f"l2 must be > 0 (it keeps the solve well posed), got {l2}")
        if decay is not None and not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1) or None, got {decay}")
        self.n_classes, self.n_units, self.l2 = int(n_classes), int(n_units), float(l2)
        self.decay, self.dtype = decay, np.dtype(dtype)
        k = self.n_classes
        self.W = np.zeros((k, self.n_units), self.dtype)
        self._syy = np.zeros((k, k))
        self._sya = np.zeros((k, self.n_units))

    def fit(self, Y, A):
        """Solve for W on this batch (or on the running statistics); returns self."""
        _check_ya(Y, A, self.n_classes, self.n_units)
        xp = backend.array_module(A)
        X = xp.asarray(Y).astype(self.dtype, copy=False)
        syy, sya = X.T.astype(np.float64) @ X, X.T @ A.astype(self.dtype, copy=False)
        if self.decay is not None:
            self._syy *= self.decay
            self._syy += syy
            self._sya *= self.decay
            self._sya += sya
            syy, sya = self._syy, self._sya
        # The system is only (k x k), k = n_classes(+1): factor it in float64 (microseconds), form
        # its inverse and apply it to the n_units-wide right-hand side with one small GEMM.
        if xp is np:
            c = scipy.linalg.cho_factor(syy + self.l2 * np.eye(len(syy)), check_finite=False)
            inv = scipy.linalg.cho_solve(c, np.eye(len(syy)), check_finite=False)
        else:  # cuSOLVER (getrf/getrs) through CuPy: no host round trip, no synchronisation
            inv = xp.linalg.inv(syy + self.l2 * xp.eye(len(syy)))
        self.W = (inv.astype(self.dtype) @ sya.astype(self.dtype, copy=False))
        return self

    def predict(self, Y):
        """B = Y W, shape (N, n_units)."""
        if Y.ndim != 2 or Y.shape[1] != self.n_classes:
            raise ValueError(f"feedback expects Y of shape (N, {self.n_classes}), got {Y.shape}")
        return Y.astype(self.dtype, copy=False) @ self.W

    def state_dict(self):
        return {"W": backend.asnumpy(self.W), "syy": backend.asnumpy(self._syy), "sya": backend.asnumpy(self._sya)}

    def load_state_dict(self, s):
        device = backend.device_of(self.W)
        self.W, self._syy, self._sya = (np.array(backend.asnumpy(s["W"]), self.dtype),
                                        np.array(backend.asnumpy(s["syy"])), np.array(backend.asnumpy(s["sya"])))
        self.to(device)

    def to(self, device):
        """Move W and the running statistics to ``device``; returns self."""
        self.W, self._syy, self._sya = (backend.to_device(a, device) for a in (self.W, self._syy, self._sya))
        return self


class TrainedLinearFeedback:
    """b = Y V + e, V and e trained by gradient descent on g_b (Eq. 8's second term).

    ``update(Y, g_b)`` applies one optimiser step with dL/dV = Yᵀ g_b, dL/de = sum g_b.
    """

    def __init__(self, n_classes, n_units, *, optimizer="adam", lr=1e-3, rng=None, dtype=np.float32, **opt_kw):
        self.n_classes, self.n_units = int(n_classes), int(n_units)
        self.net = Sequential(Dense(n_classes, n_units, rng=as_rng(rng), dtype=dtype))
        self.opt = make_optimizer(optimizer, self.net, lr, **opt_kw)

    @property
    def W(self):
        return self.net[0].params["W"]

    def predict(self, Y, train=True):
        return self.net.forward(Y.astype(self.net[0].dtype, copy=False), train=train)

    def update(self, g_b):
        self.net.backward(g_b.reshape(-1, self.n_units), need_dx=False)
        self.opt.step()

    def state_dict(self):
        return {f"params/{k}": backend.asnumpy(v) for k, v in self.net.params.items()}

    def load_state_dict(self, s):
        load_state_dict(self.net, {f"params/{k}": s[f"params/{k}"] for k in self.net.params})

    def to(self, device):
        self.net.to(device)
        self.opt.to(device)
        return self


class TwinFeedback:
    """Deep backward network mirroring the forward blocks (the main paper's feedback network).

    Stage K-1 maps the one-hot label to block K-1's units; stage k maps tanh(b_{k+1}) to block
    k's units (Dense on flattened units; convolutional blocks are handled as flat vectors instead
    of with transposed convolutions / upsampling — simpler, same message structure). Each stage
    is trained by its own block's g_b only: no gradient crosses a stage boundary either.
    """

    def __init__(self, n_classes, unit_counts, *, optimizer="adam", lr=1e-3, rng=None, dtype=np.float32,
                 **opt_kw):
        rng = as_rng(rng)
        self.unit_counts = [int(u) for u in unit_counts]
        self.n_classes = int(n_classes)
        self.stages = []
        upper = self.n_classes
        for k in range(len(self.unit_counts) - 1, -1, -1):
            layers = [] if upper == self.n_classes and k == len(self.unit_counts) - 1 else [Tanh()]
            layers.append(Dense(upper, self.unit_counts[k], rng=rng, dtype=dtype))
            self.stages.insert(0, Sequential(*layers))
            upper = self.unit_counts[k]
        self.opts = [make_optimizer(optimizer, s, lr, **opt_kw) for s in self.stages]
        self._dtype = np.dtype(dtype)

    def predict_all(self, Y, train=True):
        """[b_1, ..., b_{K-1}] for one-hot labels Y; each stage's input is detached."""
        out, upper = [None] * len(self.stages), Y.astype(self._dtype, copy=False)
        for k in range(len(self.stages) - 1, -1, -1):
            out[k] = self.stages[k].forward(upper, train=train)
            upper = out[k]
        return out

    def update(self, k, g_b):
        self.stages[k].backward(g_b.reshape(g_b.shape[0], -1), need_dx=False)
        self.opts[k].step()

    def state_dict(self):
        return {f"{k}/{n}": backend.asnumpy(v) for k, s in enumerate(self.stages) for n, v in s.params.items()}

    def load_state_dict(self, st):
        for k, s in enumerate(self.stages):
            load_state_dict(s, {f"params/{n}": st[f"{k}/{n}"] for n in s.params})

    def to(self, device):
        for s, o in zip(self.stages, self.opts):
            s.to(device)
            o.to(device)
        return self
