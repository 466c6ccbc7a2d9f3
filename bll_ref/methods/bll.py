"""Block-local learning (BLL): every block trained by its own local loss.

For hidden block k with (detached) input h_{k-1}:

    a_k = block pre-activation (natural parameters of alpha, Eq. 3), h_k = act(a_k)
    b_k = feedback message from the label (beta, Eq. 4)
    local loss = w_var(epoch) * variational term(a_k, b_k)  +  w_head * CE(head_k(h_k), y)

Variational terms (``variational=``):

* ``"gauss_ln"`` (default): Gaussian family, known variance 1, on z = LN(a_k) (layer norm over the
  block's units, no affine). The posterior message is the closed-form feedback b_k = Y W fitted to
  z on the batch (paper 003: the loss is convex in W), and the forward term of Eq. 7 / S8 with
  gamma := b_k gives g_z = -(mu(b) - mu(z)) / (N D) = (z - b) / (N D)  (mean over units).
* ``"gauss"``: the same on raw a_k (the peer's collapsing variant, kept for comparison).
* ``"eq8"``: Bernoulli, Eq. 8/9 as printed: rho = S(a + m b), alpha = S(a),
  g_a = -(rho - alpha) + rho(1 - rho) b, g_b = rho(1 - rho) b  (``eq8_terms`` selects terms).
* ``"bernoulli_kl"``: the exact gradient of KL(rho || alpha) (Eq. 7 chain rule).
* ``"none"``: predictive head only (the ablation).

The predictive head (paper 003 / Nøkland & Eidnes) estimates the -log p(y | z_k) term of the
supplement's bound (Eq. S4) that Eq. 8 drops; see DESIGN.md for why it is in the default recipe.
The last block is trained with cross-entropy on its detached input.

``span=1``: no gradient crosses a block boundary. ``span=2`` (BLL(2)): each block's local loss
also reaches the block below it, and no further.
"""
from __future__ import annotations

import numpy as np

from ..data import one_hot
from ..feedback import LinearFeedback, TrainedLinearFeedback, TwinFeedback
from ..layers.container import backward_through
from ..layers import (AvgPool2d, Dense, Flatten, LayerNorm, LeakyReLU, ReLU, Sequential, Sigmoid,
                      Tanh)
from ..layers.base import as_rng
from ..losses import kernels, local
from ..losses.output import softmax_cross_entropy
from ..optim import make_optimizer
from .common import Method, accuracy

VARIATIONAL = ("gauss_ln", "gauss", "eq8", "bernoulli_kl", "none")
FEEDBACK = ("closed", "trained", "twin")
_ACTS = (ReLU, LeakyReLU, Sigmoid, Tanh)


def between_class_fraction(h, y, n_classes) -> float:
    """Between-class variance / total variance of features h (N, ...) (1 = perfectly separated,
    0 = no class information; a collapsed representation shows ~0 or NaN-free 0)."""
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


def _head_for(shape, n_classes, rng, dtype, tokenwise=False, max_features=2048):
    """Local linear classifier on h_k; image features are average-pooled down to <= max_features;
    sequences (T, D) get a token-wise classifier."""
    if tokenwise:
        return Sequential(Dense(shape[-1], n_classes, rng=rng, dtype=dtype))
    layers = []
    if len(shape) == 3:
        c, hh, ww = shape
        k = 1
        while c * (hh // k) * (ww // k) > max_features and k < min(hh, ww):
            k += 1
        if k > 1:
            layers.append(AvgPool2d(k))
            hh, ww = hh // k, ww // k
        layers.append(Flatten())
        n_in = c * hh * ww
    else:
        n_in = int(np.prod(shape))
        if len(shape) > 1:
            layers.append(Flatten())
    layers.append(Dense(n_in, n_classes, rng=rng, dtype=dtype))
    return Sequential(*layers)


class BLL(Method):
    """Block-local training of a list of blocks. See the module docstring for the losses.

    Parameters
    ----------
    model : list of Sequential blocks (or a Sequential of them)
    n_classes : int
    variational : one of VARIATIONAL
    feedback : "closed" (ridge LS per batch), "trained" (linear, gradient-trained by g_b) or "twin"
    var_weight : weight of the variational term
    tau : mixing schedule m(epoch) = 1 / (1 + tau epoch) (supplement: tau = 0.5)
    m : constant mixing (overrides tau) — e.g. 0.01 for the transformer of Sec. 4.2
    anneal : for the Gaussian terms, multiply var_weight by m(epoch) (a fading variational term)
    head, head_weight : local predictive head on/off and its weight
    eq8_terms : subset of ("forward", "posterior") — which terms of Eq. 8 are used
    span : 1 or 2 (BLL(2))
    l2, feedback_decay : ridge strength and running-statistics decay of the closed-form feedback
    use_kernels : use the fused Numba kernels for the local losses (else the NumPy reference)
    """

    name = "bll"

    def __init__(self, model, *, n_classes=10, variational="gauss_ln", feedback="closed", var_weight=1.0,
                 tau=2.0, m=None, anneal=True, head=True, head_weight=1.0,
                 eq8_terms=("forward", "posterior"), span=1, optimizer="adam", lr=1e-3, l2=1.0,
                 feedback_decay=None, feedback_lr=1e-3, use_kernels=True, rng=0, sample_input=None):
        super().__init__(model)
        if variational not in VARIATIONAL:
            raise ValueError(f"variational must be one of {VARIATIONAL}, got {variational!r}")
        if feedback not in FEEDBACK:
            raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")
        if span not in (1, 2):
            raise ValueError(f"span must be 1 or 2, got {span}")
        bad = set(eq8_terms) - {"forward", "posterior"}
        if bad or not eq8_terms:
            raise ValueError(f"eq8_terms must be a non-empty subset of ('forward', 'posterior'), got {eq8_terms!r}")
        if not head and variational == "none":
            raise ValueError("with variational='none' and head=False the hidden blocks get no signal")
        if sample_input is None:
            raise ValueError("BLL needs sample_input (a few input rows) to size heads and feedback")
        self.blocks = list(self.model)
        self.n_classes, self.variational, self.feedback_kind = int(n_classes), variational, feedback
        self.var_weight, self.tau, self.m_const, self.anneal = float(var_weight), float(tau), m, bool(anneal)
        self.use_head, self.head_weight, self.eq8_terms = bool(head), float(head_weight), tuple(eq8_terms)
        self.span, self.use_kernels = int(span), bool(use_kernels)
        rng = as_rng(rng)
        self.dtype = self.blocks[0].params[next(iter(self.blocks[0].params))].dtype
        self.optimizers = [make_optimizer(optimizer, b, lr) for b in self.blocks]

        # shapes of a_k and h_k from one eval forward
        self.a_shapes, self.h_shapes = [], []
        x = sample_input[:2]
        for b in self.blocks[:-1]:
            a, h = self._forward_block(b, x, train=False)
            self.a_shapes.append(a.shape[1:])
            self.h_shapes.append(h.shape[1:])
            x = h
        # Sequence blocks (N, T, D) are treated token by token: units = D, samples = N T, and the
        # labels (N, T) give one feedback message per token.
        self.tokenwise = [len(s) == 2 for s in self.a_shapes]
        units = [s[-1] if tw else int(np.prod(s)) for s, tw in zip(self.a_shapes, self.tokenwise)]
        self.heads = ([_head_for(s, self.n_classes, rng, self.dtype, tw) for s, tw in zip(self.h_shapes, self.tokenwise)]
                      if head else [])
        self.head_opts = [make_optimizer(optimizer, h, lr) for h in self.heads]
        self.norms = [LayerNorm(u, affine=False, dtype=self.dtype) for u in units]
        if feedback == "closed":
            self.fb = [LinearFeedback(self.n_classes, u, l2=l2, decay=feedback_decay, dtype=self.dtype) for u in units]
        elif feedback == "trained":
            self.fb = [TrainedLinearFeedback(self.n_classes, u, optimizer=optimizer, lr=feedback_lr, rng=rng,
                                             dtype=self.dtype) for u in units]
        else:
            self.fb = TwinFeedback(self.n_classes, units, optimizer=optimizer, lr=feedback_lr, rng=rng, dtype=self.dtype)
        self._stats = None
        self.on_epoch_start(0)

    # --- schedule -----------------------------------------------------------------------------
    def mixing(self):
        """m for this epoch: constant ``m`` if given, else Eq. (supplement) m = 1 / (1 + tau epoch)."""
        return float(self.m_const) if self.m_const is not None else local.mixing(self.epoch, self.tau)

    def on_epoch_start(self, epoch):
        super().on_epoch_start(epoch)
        K = len(self.blocks) - 1
        self._stats = {"var_loss": np.zeros(K), "head_loss": np.zeros(K), "abs_a": np.zeros(K),
                       "abs_b": np.zeros(K), "out_loss": 0.0, "steps": 0}

    # --- one block ----------------------------------------------------------------------------
    @staticmethod
    def _forward_block(block, x, train):
        """Returns (a, h): pre-activation and output (a is h when there is no trailing activation)."""
        layers = block.layers
        for layer in layers[:-1]:
            x = layer.forward(x, train=train)
        if isinstance(layers[-1], _ACTS):
            return x, layers[-1].forward(x, train=train)
        h = layers[-1].forward(x, train=train)
        return h, h

    @staticmethod
    def _backward_block(block, dh, g_a, need_dx):
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

    def _variational(self, k, a, Y, b_fb):
        """Local variational term of block k -> (loss, g_a, g_b, mean |b|); all None/0 without a
        variational term. g_b (dL/db) only trains "trained"/"twin" feedback; closed-form feedback
        is solved, not trained."""
        if self.variational == "none":
            return 0.0, None, None, 0.0
        A = a.reshape(-1, a.shape[-1]) if self.tokenwise[k] else a.reshape(len(a), -1)
        w = self.var_weight
        if self.variational in ("gauss_ln", "gauss"):
            if self.anneal:
                w *= self.mixing()
            z = self.norms[k].forward(A, train=True) if self.variational == "gauss_ln" else A
            b = self.fb[k].fit(Y, z).predict(Y) if self.feedback_kind == "closed" else b_fb
            D = z.shape[1]
            # Eq. 7 / S8, Gaussian family (s2 = 1), posterior natural parameter gamma := b:
            # forward weight -(mu(b) - mu(z)); the 1/D makes it a mean over units (peer-results).
            loss, g_z, g_b = self._loss_and_grads("gaussian", z, b)
            scale = self.dtype.type(w / D)
            g_A = g_z * scale
            if self.variational == "gauss_ln":
                g_A = self.norms[k].backward(g_A)
            return w * loss / D, g_A.reshape(a.shape), g_b * scale, float(np.abs(b).mean())
        m = self.mixing()
        b = self.fb[k].fit(Y, A).predict(Y) if self.feedback_kind == "closed" else b_fb
        if self.variational == "eq8":
            loss, g_a, g_b = self._eq8(A, b, m)
            # Eq. 8: g_a = -(rho - alpha) [forward weight] + rho(1 - rho) b [posterior weight = g_b]
            if "posterior" not in self.eq8_terms:
                g_a = g_a - g_b
            if "forward" not in self.eq8_terms:
                g_a = g_b.copy()
        else:  # exact gradient of KL(rho || alpha), gamma = a + m b (Eq. 7 chain rule)
            loss, g_phi, g_gamma = self._loss_and_grads("bernoulli", A, A + m * b)
            g_a, g_b = g_phi + g_gamma, m * g_gamma
        scale = self.dtype.type(w)
        return w * loss, (g_a * scale).reshape(a.shape), g_b * scale, float(np.abs(b).mean())

    def _loss_and_grads(self, family, phi, gamma):
        """KL(rho || alpha) (Eq. S7) and its gradients (Eq. 7 / S8), fused kernel or reference."""
        impl = kernels if self.use_kernels else local
        return impl.kl_ef_gradients(family, phi, gamma)

    def _eq8(self, A, b, m):
        return (kernels if self.use_kernels else local).bernoulli_eq8(A, b, m)

    # --- the training step ----------------------------------------------------------------------
    def _feedback_messages(self, Y, train=True):
        if self.feedback_kind == "closed" or self.variational == "none":  # solved later / unused
            return [None] * (len(self.blocks) - 1)
        if self.feedback_kind == "twin":
            return [b.reshape(len(Y), -1) for b in self.fb.predict_all(Y, train=train)]
        return [f.predict(Y, train=train) for f in self.fb]

    def train_step(self, x, y):
        """One BLL step. Every block's input is the detached output of the block below, computed
        with the pre-update weights, so the per-block steps below are independent: running them
        in any order (or in parallel) gives the same result."""
        Y = one_hot(y, self.n_classes, dtype=self.dtype).reshape(-1, self.n_classes)
        b_fb = self._feedback_messages(Y)
        inputs, pre = [x], []
        for block in self.blocks[:-1]:
            a, h = self._forward_block(block, inputs[-1], train=True)
            pre.append(a)
            inputs.append(h)
        logits = self.blocks[-1].forward(inputs[-1], train=True)
        from_above = None
        for k in range(len(self.blocks) - 1, -1, -1):
            from_above = self.step_block(k, inputs[k + 1] if k < len(pre) else logits,
                                         pre[k] if k < len(pre) else None, y, Y,
                                         b_fb[k] if k < len(pre) else None, from_above)
        self._stats["steps"] += 1
        return self._last_loss

    def step_block(self, k, h, a, y, Y, b_fb, from_above=None):
        """Local loss, local backward and update of block k (h: its output, a: its pre-activation).

        Returns dL_k/d(input of block k) when span = 2 (to be applied to block k - 1), else None.
        ``from_above``: the gradient that block k + 1's loss sends into this block (span = 2).
        """
        block, st = self.blocks[k], self._stats
        pass_down = self.span == 2 and k > 0
        if k == len(self.blocks) - 1:  # output block: cross-entropy on its detached input
            loss, dz = softmax_cross_entropy(h, y)
            self._last_loss = loss
            st["out_loss"] += loss
            dx = block.backward(dz, need_dx=pass_down)
        else:
            dh = None
            if self.use_head:
                logits = self.heads[k].forward(h, train=True)
                hl, dlog = softmax_cross_entropy(logits, y)
                dh = self.heads[k].backward(dlog * self.dtype.type(self.head_weight))
                self.head_opts[k].step()
                st["head_loss"][k] += hl
            vl, g_a, g_b, abs_b = self._variational(k, a, Y, b_fb)
            if g_b is not None and self.feedback_kind == "trained":
                self.fb[k].update(g_b)
            elif g_b is not None and self.feedback_kind == "twin":
                self.fb.update(k, g_b)
            st["var_loss"][k] += vl
            st["abs_a"][k] += float(np.abs(a).mean())
            st["abs_b"][k] += abs_b
            dx = self._backward_block(block, dh, g_a, need_dx=pass_down)
        if from_above is not None:  # BLL(2): block k+1's loss reaches this block, and stops here
            own = {n: g.copy() for n, g in block.grads.items()}
            if k == len(self.blocks) - 1:
                block.backward(from_above, need_dx=False)
            else:
                self._backward_block(block, from_above, None, need_dx=False)
            for n, g in block.grads.items():
                g += own[n]
        self.optimizers[k].step()
        return dx if pass_down else None

    # --- diagnostics ------------------------------------------------------------------------------
    def epoch_diagnostics(self, x, y):
        """Per block: mean local losses and |a|, |b| over the epoch's steps; between-class variance
        fraction of the block output and the local head's accuracy on (x, y)."""
        st, n = self._stats, max(self._stats["steps"], 1)
        out = {"epoch": self.epoch, "m": self.mixing(), "blocks": []}
        h = x
        for k, block in enumerate(self.blocks[:-1]):
            a, h = self._forward_block(block, h, train=False)
            feats = h.reshape(-1, h.shape[-1]) if self.tokenwise[k] else h
            d = {"block": k + 1, "var_loss": st["var_loss"][k] / n, "head_loss": st["head_loss"][k] / n,
                 "mean_abs_a": st["abs_a"][k] / n, "mean_abs_b": st["abs_b"][k] / n,
                 "between_class_fraction": between_class_fraction(feats, y.reshape(-1), self.n_classes)}
            if self.use_head:
                d["head_acc"] = accuracy(self.heads[k].forward(h, train=False), y)
            out["blocks"].append(d)
        out["out_loss"] = st["out_loss"] / n
        return out

    def aux_state(self) -> dict:
        """Heads and feedback weights (saved next to the model in checkpoints and exports)."""
        s = {f"head{k}/{n}": v for k, hd in enumerate(self.heads) for n, v in hd.params.items()}
        if self.feedback_kind == "twin":
            s.update({f"feedback/{n}": v for n, v in self.fb.state_dict().items()})
        else:
            for k, f in enumerate(self.fb):
                s.update({f"feedback{k}/{n}": v for n, v in f.state_dict().items()})
        return s
