"""Block learners: block k of a BLL model plus everything it trains with.

A hidden learner owns its block, its local predictive head, its layer norm, its feedback network
(or its stage of the twin network), their optimisers and its statistics. Its step is

    h_out = learner.forward(h_in)        # with the pre-update weights; hand h_out on now
    learner.update(y, Y)                 # local loss, local backward, optimiser steps

Nothing in ``update`` reads another block, so with span 1 and label-only feedback the learners of
a model can run in a pipeline, each on its own worker, and make the same updates bit for bit as
the sequential loop (DESIGN.md, "Why a pipeline is exact"). The output learner trains the last
block with cross-entropy on its detached input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from ..layers import LeakyReLU, ReLU, Sigmoid, Tanh
from ..layers.base import load_state_dict as load_layer_state
from ..layers.base import state_dict as layer_state
from ..layers.container import backward_through
from ..losses import kernels, local, predsim
from ..losses.output import softmax_cross_entropy
from .common import accuracy

_ACTS = (ReLU, LeakyReLU, Sigmoid, Tanh)


@dataclass(frozen=True)
class LocalRule:
    """The local loss every hidden learner of one BLL model uses (see methods/bll.py)."""

    n_classes: int
    variational: str
    feedback: str
    var_weight: float
    tau: float
    m: float | None
    anneal: bool
    use_head: bool
    head_weight: float
    eq8_terms: tuple
    span: int
    use_kernels: bool

    def mixing(self, epoch) -> float:
        """m for this epoch: the constant ``m`` if given, else m = 1 / (1 + tau epoch) (supplement)."""
        return float(self.m) if self.m is not None else local.mixing(epoch, self.tau)


def forward_block(block, x, train):
    """(a, h): a block's pre-activation and output (a is h when there is no trailing activation)."""
    layers = block.layers
    for layer in layers[:-1]:
        x = layer.forward(x, train=train)
    if isinstance(layers[-1], _ACTS):
        return x, layers[-1].forward(x, train=train)
    h = layers[-1].forward(x, train=train)
    return h, h


def backward_block(block, dh, g_a, need_dx):
    """Backward through a block given dL/dh (through its trailing activation) and dL/da."""
    layers = block.layers
    if isinstance(layers[-1], _ACTS):
        d = layers[-1].backward(dh) if dh is not None else None
        d = g_a if d is None else (d if g_a is None else d + g_a)
        rest = layers[:-1]
    else:
        d = dh if g_a is None else (g_a if dh is None else dh + g_a)
        rest = layers
    return backward_through(rest, d, need_dx)


def between_class_fraction(h, y, n_classes) -> float:
    """Between-class variance / total variance of features h (N, ...) (1 = perfectly separated,
    0 = no class information; a collapsed representation shows ~0 or NaN-free 0)."""
    h, y = backend.asnumpy(h), backend.asnumpy(y)
    h = h.reshape(len(h), -1).astype(np.float64)
    mu = h.mean(axis=0)
    total = ((h - mu) ** 2).sum() / len(h)
    if total <= 1e-30:
        return 0.0
    between = 0.0
    for c in range(n_classes):
        sel = y == c
        if sel.any():
            between += sel.sum() * ((h[sel].mean(axis=0) - mu) ** 2).sum()
    return float(between / len(h) / total)


def _mean_abs(x):
    """mean |x|: a float on the CPU, a device scalar on the GPU (read once per epoch, not per step)."""
    m = backend.array_module(x).abs(x).mean()
    return m if backend.is_device_array(m) else float(m)


def _loss_kernels(rule, x):
    """The module whose local-loss functions take ``x``: the numba.cuda kernels for a GPU array,
    else the fused Numba kernels or the NumPy reference (``rule.use_kernels``)."""
    if backend.is_device_array(x):
        return backend.loss_kernels_gpu()
    return kernels if rule.use_kernels else local


def pack_states(learners) -> dict:
    """The states of ``learners`` as one flat dict keyed ``learner<k>/<name>``."""
    return {f"learner{l.k}/{n}": v for l in learners for n, v in l.state_dict().items()}


def unpack_states(state) -> dict:
    """Inverse of ``pack_states``: {k: that learner's state}; ValueError for a key of no learner."""
    out = {}
    for key, v in state.items():
        head, _, name = key.partition("/")
        k = head[len("learner"):]
        if not (head.startswith("learner") and k.isdigit() and name):
            raise ValueError(f"state entry {key!r} belongs to no learner (expected learner<k>/<name>)")
        out.setdefault(int(k), {})[name] = v
    return out


def _prefixed(prefix, d):
    return {f"{prefix}/{k}": v for k, v in d.items()}


def _sub(state, prefix):
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + "/")}


class _Learner:
    """What hidden and output learners share: the block, its optimiser, statistics, state."""

    def __init__(self, k, block, optimizer, rule):
        self.k, self.block, self.opt, self.rule = k, block, optimizer, rule
        self.epoch = 0
        self.stats = {}
        self.pass_down = rule.span == 2 and k > 0
        self._fresh = False

    def begin_epoch(self, epoch):
        self.epoch = epoch
        self.stats = {k: 0.0 for k in self.STATS}

    def to(self, device):
        """Move the optimiser's state to ``device`` (after the block moved with the model)."""
        self.opt.to(device)
        return self

    def _take_forward(self):
        if not self._fresh:
            raise RuntimeError(f"learner {self.k}: update() needs a forward(h_in, train=True) first")
        self._fresh = False

    def _add_from_above(self, from_above, backward):
        """BLL(2): the gradient block k+1's loss sends into this block is added to its own."""
        own = {n: g.copy() for n, g in self.block.grads.items()}
        backward(from_above)
        for n, g in self.block.grads.items():
            g += own[n]

    def _own_state(self) -> dict:
        s = _prefixed("block", layer_state(self.block))
        s.update(_prefixed("opt", self.opt.state_dict()))
        s.update({f"stats/{k}": np.float64(float(v)) for k, v in self.stats.items()})
        s["epoch"] = np.int64(self.epoch)
        return s

    def _load_own(self, state):
        load_layer_state(self.block, _sub(state, "block"))
        self.opt.load_state_dict(_sub(state, "opt"))
        self.stats = {k: float(state[f"stats/{k}"]) for k in self.STATS}
        self.epoch = int(state["epoch"])

    def load_state_dict(self, state):
        want = set(self.state_dict())
        if set(state) != want:
            missing, extra = sorted(want - set(state)), sorted(set(state) - want)
            raise ValueError(f"learner {self.k} state does not match: missing {missing[:4]}, unexpected {extra[:4]}")
        self._load_state(state)



class HiddenLearner(_Learner):
    """Block k < K-1: variational term against the feedback message + local predictive head."""

    STATS = ("var_loss", "head_loss", "abs_a", "abs_b", "steps")

    def __init__(self, k, block, optimizer, rule, *, head=None, head_opt=None, norm=None,
                 feedback=None, twin=None, tokenwise=False):
        super().__init__(k, block, optimizer, rule)
        self.head, self.head_opt, self.norm = head, head_opt, norm
        self.feedback, self.twin, self.tokenwise = feedback, twin, bool(tokenwise)
        self.dtype = block.params[next(iter(block.params))].dtype
        self._a = self._h = None
        self.begin_epoch(0)

    def mixing(self) -> float:
        return self.rule.mixing(self.epoch)

    def to(self, device):
        """Move the block's optimiser, head, norm and feedback to ``device`` (the block itself is
        moved with the model; twin feedback is moved once by the method)."""
        if device == "cuda" and self.rule.variational == "sim":
            raise backend.DeviceError("Pred-Sim (variational 'sim') has no GPU path yet; use --device cpu")
        super().to(device)
        for part in (self.head, self.head_opt, self.norm, self.feedback):
            if part is not None:
                part.to(device)
        return self

    def forward(self, h_in, train=True):
        """h_k = block(h_in); with ``train`` the block caches for ``update``."""
        a, h = forward_block(self.block, h_in, train)
        if train:
            self._a, self._h, self._fresh = a, h, True
        return h

    def update(self, y, Y, b_fb=None, from_above=None):
        """Local loss, backward and optimiser steps for the batch of the last ``forward``.

        y : labels (N,) or (N, T); Y : one-hot labels (N*, n_classes); b_fb : this block's message
        from trained/twin feedback (None for closed-form feedback, which is solved here).
        Returns dL_k/d(input) under BLL(2), else None.
        """
        self._take_forward()
        rule, st, a, h = self.rule, self.stats, self._a, self._h
        if b_fb is None and rule.feedback == "trained" and rule.variational != "none":
            b_fb = self.feedback.predict(Y, train=True)
        dh = None
        if rule.use_head:
            logits = self.head.forward(h, train=True)
            hl, dlog = softmax_cross_entropy(logits, y)
            dh = self.head.backward(dlog * self.dtype.type(rule.head_weight))
            self.head_opt.step()
            st["head_loss"] += hl
        if rule.variational == "sim":
            dh = self._similarity(h, Y, dh)
        vl, g_a, g_b, abs_b = self.variational(a, Y, b_fb)
        if g_b is not None and rule.feedback == "trained":
            self.feedback.update(g_b)
        elif g_b is not None and rule.feedback == "twin":
            self.twin.update(self.k, g_b)
        st["var_loss"] += vl
        st["abs_a"] += _mean_abs(a)
        st["abs_b"] += abs_b
        st["steps"] += 1
        dx = backward_block(self.block, dh, g_a, need_dx=self.pass_down)
        if from_above is not None:
            self._add_from_above(from_above, lambda g: backward_block(self.block, g, None, need_dx=False))
        self.opt.step()
        return dx if self.pass_down else None

    def _similarity(self, h, Y, dh):
        """Pred-Sim's similarity-matching term (Nøkland & Eidnes 2019, ``losses/predsim.py``) on
        the block output h, weighted by var_weight; adds its gradient to dh (the head's, or None)."""
        feats = h.reshape(-1, h.shape[-1]) if self.tokenwise else h
        loss, g = predsim.sim_loss(feats, Y)
        g = g.reshape(h.shape) * self.dtype.type(self.rule.var_weight)
        self.stats["var_loss"] += self.rule.var_weight * loss
        return g if dh is None else dh + g

    def variational(self, a, Y, b_fb):
        """Local variational term -> (loss, g_a, g_b, mean |b|); (0, None, None, 0) without one.
        g_b (dL/db) only trains "trained"/"twin" feedback; closed-form feedback is solved, so
        there g_b is None (not scaled: a pass over the block's units saved per step).
        ("sim" is no variational term: its similarity loss acts on h, in ``_similarity``.)"""
        rule = self.rule
        if rule.variational in ("none", "sim"):
            return 0.0, None, None, 0.0
        A = a.reshape(-1, a.shape[-1]) if self.tokenwise else a.reshape(len(a), -1)
        w = rule.var_weight
        if rule.variational in ("gauss_ln", "gauss"):
            if rule.anneal:
                w *= self.mixing()
            z = self.norm.forward(A, train=True) if rule.variational == "gauss_ln" else A
            b = self.feedback.fit(Y, z).predict(Y) if rule.feedback == "closed" else b_fb
            D = z.shape[1]
            # Eq. 7 / S8, Gaussian family (s2 = 1), posterior natural parameter gamma := b:
            # forward weight -(mu(b) - mu(z)); the 1/D makes it a mean over units (peer-results).
            loss, g_z, g_b = self._kl_ef("gaussian", z, b)
            scale = self.dtype.type(w / D)
            g_A = g_z * scale
            if rule.variational == "gauss_ln":
                g_A = self.norm.backward(g_A)
            g_b = None if rule.feedback == "closed" else g_b * scale
            return w * loss / D, g_A.reshape(a.shape), g_b, _mean_abs(b)
        m = self.mixing()
        b = self.feedback.fit(Y, A).predict(Y) if rule.feedback == "closed" else b_fb
        if rule.variational == "eq8":
            loss, g_a, g_b = _loss_kernels(rule, A).bernoulli_eq8(A, b, m)
            # Eq. 8: g_a = -(rho - alpha) [forward weight] + rho(1 - rho) b [posterior weight = g_b]
            if "posterior" not in rule.eq8_terms:
                g_a = g_a - g_b
            if "forward" not in rule.eq8_terms:
                g_a = g_b.copy()
        else:  # exact gradient of KL(rho || alpha), gamma = a + m b (Eq. 7 chain rule)
            loss, g_phi, g_gamma = self._kl_ef("bernoulli", A, A + m * b)
            g_a, g_b = g_phi + g_gamma, m * g_gamma
        scale = self.dtype.type(w)
        g_b = None if rule.feedback == "closed" else g_b * scale
        return w * loss, (g_a * scale).reshape(a.shape), g_b, _mean_abs(b)

    def _kl_ef(self, family, phi, gamma):
        """KL(rho || alpha) (Eq. S7) and its gradients (Eq. 7 / S8), fused kernel or reference."""
        return _loss_kernels(self.rule, phi).kl_ef_gradients(family, phi, gamma)

    def diagnostics(self, h_in, y):
        """(dict, h_out): the epoch's mean local losses and |a|, |b|; between-class variance
        fraction of the block output and the head's accuracy on (h_in, y)."""
        st = {k: float(v) for k, v in self.stats.items()}
        n = max(st["steps"], 1)
        a, h = forward_block(self.block, h_in, train=False)
        feats = h.reshape(-1, h.shape[-1]) if self.tokenwise else h
        d = {"block": self.k + 1, "var_loss": st["var_loss"] / n, "head_loss": st["head_loss"] / n,
             "mean_abs_a": st["abs_a"] / n, "mean_abs_b": st["abs_b"] / n,
             "between_class_fraction": between_class_fraction(feats, y.reshape(-1), self.rule.n_classes)}
        if self.rule.use_head:
            d["head_acc"] = accuracy(self.head.forward(h, train=False), y)
        return d, h

    # --- state ----------------------------------------------------------------------------------
    def head_aux(self) -> dict:
        """Head weights under the checkpoint's ``aux`` names."""
        return ({f"head{self.k}/{n}": backend.asnumpy(v) for n, v in self.head.params.items()}
                if self.head is not None else {})

    def feedback_aux(self) -> dict:
        """Feedback weights under the checkpoint's ``aux`` names."""
        if self.twin is not None:
            return {f"feedback/{self.k}/{n}": backend.asnumpy(v) for n, v in self.twin.stages[self.k].params.items()}
        if self.feedback is not None:
            return {f"feedback{self.k}/{n}": v for n, v in self.feedback.state_dict().items()}
        return {}

    def state_dict(self) -> dict:
        """Everything this learner trains with: block, head, feedback, optimisers, statistics."""
        s = self._own_state()
        if self.head is not None:
            s.update(_prefixed("head", layer_state(self.head)))
            s.update(_prefixed("head_opt", self.head_opt.state_dict()))
        if self.twin is not None:
            s.update(_prefixed("feedback", layer_state(self.twin.stages[self.k])))
            s.update(_prefixed("feedback_opt", self.twin.opts[self.k].state_dict()))
        elif self.feedback is not None:
            s.update(_prefixed("feedback", self.feedback.state_dict()))
            if hasattr(self.feedback, "opt"):
                s.update(_prefixed("feedback_opt", self.feedback.opt.state_dict()))
        return s

    def _load_state(self, state):
        self._load_own(state)
        if self.head is not None:
            load_layer_state(self.head, _sub(state, "head"))
            self.head_opt.load_state_dict(_sub(state, "head_opt"))
        if self.twin is not None:
            load_layer_state(self.twin.stages[self.k], _sub(state, "feedback"))
            self.twin.opts[self.k].load_state_dict(_sub(state, "feedback_opt"))
        elif self.feedback is not None:
            self.feedback.load_state_dict(_sub(state, "feedback"))
            if hasattr(self.feedback, "opt"):
                self.feedback.opt.load_state_dict(_sub(state, "feedback_opt"))



class OutputLearner(_Learner):
    """The last block: softmax cross-entropy on its detached input."""

    STATS = ("out_loss", "steps")

    def __init__(self, k, block, optimizer, rule):
        super().__init__(k, block, optimizer, rule)
        self.last_loss = None
        self.begin_epoch(0)

    def forward(self, h_in, train=True):
        logits = self.block.forward(h_in, train=train)
        if train:
            self._logits, self._fresh = logits, True
        return logits

    def update(self, y, Y=None, b_fb=None, from_above=None):
        """Cross-entropy step; the loss is in ``last_loss``. Returns dL/d(input) under BLL(2)."""
        self._take_forward()
        loss, dz = softmax_cross_entropy(self._logits, y)
        self.last_loss = loss
        self.stats["out_loss"] += loss
        self.stats["steps"] += 1
        dx = self.block.backward(dz, need_dx=self.pass_down)
        if from_above is not None:
            self._add_from_above(from_above, lambda g: self.block.backward(g, need_dx=False))
        self.opt.step()
        return dx if self.pass_down else None

    def state_dict(self) -> dict:
        return self._own_state()

    def _load_state(self, state):
        self._load_own(state)
