"""Block learners: block k of a BLL model plus everything it trains with.

A hidden learner owns its block, its local predictive head, its layer norm, its feedback network
(or its stage of the twin network), their optimisers and its statistics. Its step is

    h_out = learner.forward(h_in)        # with the pre-update weights; hand h_out on now
    learner.update(y, Y)                 # local loss, local backward, optimiser steps

Nothing in ``update`` reads another block, so with span 1 and label-only feedback the learners of
a model can run in a pipeline, each on its own worker, and make the same updates bit for bit as
the sequential loop (docs/architecture.md, "Why a pipeline of block learners is exact"). The output learner trains the last
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
from ..losses import local
from ..losses.output import softmax_cross_entropy
from .common import accuracy
from .terms import mean_abs

__all__ = ["HiddenLearner", "OutputLearner", "LocalRule", "forward_block", "backward_block",
           "between_class_fraction", "pack_states", "unpack_states"]

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
    """Block k < K-1: a variational term against the feedback message + local predictive head.

    The term (``terms.py``: Gaussian on LN(a), Gaussian, Eq. 8, Bernoulli KL, similarity, none)
    and the message source (``messages.py``: closed-form, trained or twin feedback) are strategy
    objects, so nothing here depends on which ones a model uses."""

    STATS = ("var_loss", "head_loss", "abs_a", "abs_b", "steps")

    def __init__(self, k, block, optimizer, rule, *, term, source=None, head=None, head_opt=None,
                 norm=None, tokenwise=False):
        super().__init__(k, block, optimizer, rule)
        self.term, self.source = term, source
        self.head, self.head_opt, self.norm = head, head_opt, norm
        self.tokenwise = bool(tokenwise)
        self.dtype = block.params[next(iter(block.params))].dtype
        self._a = self._h = None
        self.begin_epoch(0)

    @property
    def feedback(self):
        """The feedback network of a closed-form or trained source (None for twin or none)."""
        return getattr(self.source, "net", None)

    def mixing(self) -> float:
        return self.rule.mixing(self.epoch)

    def to(self, device):
        """Move the block's optimiser, head, norm and feedback to ``device`` (the block itself is
        moved with the model; twin feedback is moved once by the method)."""
        super().to(device)
        for part in (self.head, self.head_opt, self.norm, self.source):
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
        from the twin network (None otherwise). Returns dL_k/d(input) under BLL(2), else None.
        """
        self._take_forward()
        rule, st, a, h = self.rule, self.stats, self._a, self._h
        if self.source is not None and self.term.uses_feedback:
            self.source.begin(Y, b_fb)
        dh = None
        if rule.use_head:
            logits = self.head.forward(h, train=True)
            hl, dlog = softmax_cross_entropy(logits, y)
            dh = self.head.backward(dlog * self.dtype.type(rule.head_weight))
            self.head_opt.step()
            st["head_loss"] += hl
        dh = self.term.on_output(self, h, Y, dh)
        vl, g_a, g_b, abs_b = self.term.grads(self, a, Y, b_fb)
        if g_b is not None:
            self.source.learn(g_b)
        st["var_loss"] += vl
        st["abs_a"] += mean_abs(a)
        st["abs_b"] += abs_b
        st["steps"] += 1
        dx = backward_block(self.block, dh, g_a, need_dx=self.pass_down)
        if from_above is not None:
            self._add_from_above(from_above, lambda g: backward_block(self.block, g, None, need_dx=False))
        self.opt.step()
        return dx if self.pass_down else None

    def variational(self, a, Y, b_fb=None):
        """The variational term alone on a given a (and message b_fb): (loss, g_a, g_b, mean ``|b|``)."""
        return self.term.grads(self, a, Y, b_fb)

    def diagnostics(self, h_in, y):
        """(dict, h_out): the epoch's mean local losses and ``|a|``, ``|b|``; between-class variance
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
        return self.source.aux(self.k) if self.source is not None else {}

    def state_dict(self) -> dict:
        """Everything this learner trains with: block, head, feedback, optimisers, statistics."""
        s = self._own_state()
        if self.head is not None:
            s.update(_prefixed("head", layer_state(self.head)))
            s.update(_prefixed("head_opt", self.head_opt.state_dict()))
        if self.source is not None:
            s.update(self.source.state_dict())
        return s

    def _load_state(self, state):
        self._load_own(state)
        if self.head is not None:
            load_layer_state(self.head, _sub(state, "head"))
            self.head_opt.load_state_dict(_sub(state, "head_opt"))
        if self.source is not None:
            self.source.load_state_dict(state)


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
