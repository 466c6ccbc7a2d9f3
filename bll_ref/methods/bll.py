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
* ``"sim"``: Pred-Sim (Nøkland & Eidnes 2019, the baseline of paper 003): no feedback network;
  the similarity-matching loss mean((S(pool(h_k)) - S(Y))^2) (``losses/predsim.py``) weighted by
  ``var_weight`` (default 99 = beta / (1 - beta) for N&E's beta = 0.99, so with the head at weight
  1 the block gradient is N&E's (1 - beta) pred + beta sim up to a factor Adam ignores).

The predictive head (paper 003 / Nøkland & Eidnes) estimates the -log p(y | z_k) term of the
supplement's bound (Eq. S4) that Eq. 8 drops; docs/architecture.md says why it is in the default recipe.
The last block is trained with cross-entropy on its detached input.

``span=1``: no gradient crosses a block boundary. ``span=2`` (BLL(2)): each block's local loss
also reaches the block below it, and no further.
"""
from __future__ import annotations

import numpy as np

from ..data import one_hot
from ..feedback import LinearFeedback, TrainedLinearFeedback, TwinFeedback
from ..layers import AvgPool2d, Dense, Flatten, LayerNorm, Sequential
from ..layers.base import as_rng
from ..optim import make_optimizer
from .common import Method
from .messages import SOURCES, ClosedForm, Trained, TwinStage
from .terms import TERMS
from .learner import (HiddenLearner, LocalRule, OutputLearner, between_class_fraction, forward_block,
                      pack_states, unpack_states)

__all__ = ["BLL", "VARIATIONAL", "FEEDBACK", "BLL_OPTIONS", "check_options", "between_class_fraction"]

VARIATIONAL = tuple(TERMS)   # "gauss_ln", "gauss", "eq8", "bernoulli_kl", "none", "sim"
FEEDBACK = tuple(SOURCES)    # "closed", "trained", "twin"


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


def _given(**options):
    return [k for k, v in options.items() if v is not None]


def _refuse(options, why):
    given = _given(**options)
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}; "
                         "leave it out")


#: BLL's own keywords (besides the optimiser's): ``methods.make`` refuses them for BP and FA
BLL_OPTIONS = ("n_classes", "variational", "feedback", "var_weight", "tau", "m", "anneal", "head", "head_weight",
               "eq8_terms", "span", "l2", "feedback_decay", "feedback_lr", "use_kernels")


def check_options(*, variational="gauss_ln", feedback=None, var_weight=None, tau=None, m=None, anneal=None,
                  head=True, head_weight=None, eq8_terms=None, span=1, l2=None, feedback_decay=None,
                  feedback_lr=None):
    """ValueError for a BLL option value that is not one, or an option that does not apply to the
    chosen variant (what applies is declared by the term and the feedback source classes); no
    model needed, so a training run checks its options before loading anything."""
    if variational not in VARIATIONAL:
        raise ValueError(f"variational must be one of {VARIATIONAL}, got {variational!r}")
    if feedback is not None and feedback not in FEEDBACK:
        raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")
    if span not in (1, 2):
        raise ValueError(f"span must be 1 or 2, got {span}")
    if not head and variational == "none":
        raise ValueError("with variational='none' and head=False the hidden blocks get no signal")
    options = dict(feedback=feedback, var_weight=var_weight, tau=tau, m=m, anneal=anneal,
                   eq8_terms=eq8_terms, l2=l2, feedback_decay=feedback_decay, feedback_lr=feedback_lr)
    _refuse_inapplicable(options, TERMS[variational](), SOURCES[feedback or "closed"])
    if anneal is False:
        _refuse(dict(tau=tau, m=m), "with anneal=False (the Gaussian term then never uses the mixing m)")
    if m is not None:
        _refuse(dict(tau=tau), "with a constant m (tau sets the schedule m = 1 / (1 + tau epoch))")
    if not head:
        _refuse(dict(head_weight=head_weight), "with head=False")


def _refuse_inapplicable(options, term, source):
    """ValueError naming every given option that neither the term nor its message source takes
    (what each accepts is declared by its class: ``terms.py``, ``messages.py``)."""
    takes = term.OPTIONS | (source.OPTIONS | {"feedback"} if term.uses_feedback else frozenset())
    given = [k for k in _given(**options) if k not in takes]
    if not given:
        return
    what = f"variational={term.name!r}"
    if term.uses_feedback:
        what += f" with feedback={source.name!r}"
    elif term.name in ("none", "sim"):
        what += " (no feedback network" + (", no mixing)" if term.name == "sim" else ")")
    accepted = sorted(takes) or ["none"]
    raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {what} "
                     f"(it takes: {', '.join(accepted)}); leave it out")


class BLL(Method):
    """Block-local training: a list of block learners plus a schedule (see the module docstring).

    Parameters
    ----------
    model : list of Sequential blocks (or a Sequential of them)
    n_classes : int
    variational : one of VARIATIONAL ("sim": Pred-Sim, see the module docstring)
    feedback : "closed" (ridge LS per batch, default), "trained" (linear, gradient-trained by g_b)
        or "twin" (the paper's deep backward network); not with variational="none" or "sim"
    var_weight : weight of the variational term (default 1; 99 for "sim")
    tau : mixing schedule m(epoch) = 1 / (1 + tau epoch) (default 2; supplement: tau = 0.5)
    m : constant mixing instead of the schedule — e.g. 0.01 for the transformer of Sec. 4.2
    anneal : Gaussian terms only: multiply var_weight by m(epoch) (default True)
    head, head_weight : local predictive head on/off and its weight (default 1)
    eq8_terms : variational="eq8" only: non-empty subset of ("forward", "posterior") (default both)
    span : 1 or 2 (BLL(2))
    optimizer, lr, **opt_kw : optimiser of every block, head and trained feedback (e.g. momentum)
    l2, feedback_decay : closed-form feedback only: ridge strength (default 1), running-statistics decay
    feedback_lr : trained/twin feedback only: its learning rate (default 1e-3)
    use_kernels : fused Numba kernels for the local losses (else the NumPy reference)
    rng : seed or Generator for the heads and trained feedback
    sample_input : a few input rows, to size the heads and feedback networks

    Notes
    -----
    An option that does not apply to the chosen variant raises ValueError instead of being ignored.
    """

    name = "bll"

    def __init__(self, model, *, n_classes=10, variational="gauss_ln", feedback=None, var_weight=None,
                 tau=None, m=None, anneal=None, head=True, head_weight=None, eq8_terms=None, span=1,
                 optimizer="adam", lr=1e-3, l2=None, feedback_decay=None, feedback_lr=None,
                 use_kernels=True, rng=0, sample_input=None, **opt_kw):
        super().__init__(model)
        if sample_input is None:
            raise ValueError("BLL needs sample_input (a few input rows) to size heads and feedback")
        check_options(variational=variational, feedback=feedback, var_weight=var_weight, tau=tau, m=m,
                      anneal=anneal, head=head, head_weight=head_weight, eq8_terms=eq8_terms, span=span, l2=l2,
                      feedback_decay=feedback_decay, feedback_lr=feedback_lr)
        term = TERMS[variational]()
        if variational == "sim" and var_weight is None:
            var_weight = 99.0  # N&E: beta = 0.99 on sim, 0.01 on pred
        feedback = feedback or "closed"
        eq8_terms = ("forward", "posterior") if eq8_terms is None else tuple(eq8_terms)
        bad = set(eq8_terms) - {"forward", "posterior"}
        if bad or not eq8_terms:
            raise ValueError(f"eq8_terms must be a non-empty subset of ('forward', 'posterior'), got {eq8_terms!r}")
        self.rule = LocalRule(
            n_classes=int(n_classes), variational=variational, feedback=feedback,
            var_weight=1.0 if var_weight is None else float(var_weight), tau=2.0 if tau is None else float(tau),
            m=None if m is None else float(m), anneal=True if anneal is None else bool(anneal),
            use_head=bool(head), head_weight=1.0 if head_weight is None else float(head_weight),
            eq8_terms=eq8_terms, span=int(span), use_kernels=bool(use_kernels))
        self.n_classes, self.span = self.rule.n_classes, self.rule.span
        rng = as_rng(rng)
        self.blocks = list(self.model)
        self.dtype = self.blocks[0].params[next(iter(self.blocks[0].params))].dtype
        opts = [make_optimizer(optimizer, b, lr, **opt_kw) for b in self.blocks]

        # shapes of a_k and h_k from one eval forward
        a_shapes, h_shapes, x = [], [], sample_input[:2]
        for b in self.blocks[:-1]:
            a, x = forward_block(b, x, train=False)
            a_shapes.append(a.shape[1:])
            h_shapes.append(x.shape[1:])
        # Sequence blocks (N, T, D) are treated token by token: units = D, samples = N T, and the
        # labels (N, T) give one feedback message per token.
        tokenwise = [len(s) == 2 for s in a_shapes]
        units = [s[-1] if tw else int(np.prod(s)) for s, tw in zip(a_shapes, tokenwise)]
        # The draw order (all heads, then all feedback networks) fixes the initial weights.
        heads = [_head_for(s, self.n_classes, rng, self.dtype, tw) if head else None
                 for s, tw in zip(h_shapes, tokenwise)]
        head_opts = [make_optimizer(optimizer, h, lr, **opt_kw) if h is not None else None for h in heads]
        fb_lr = 1e-3 if feedback_lr is None else feedback_lr
        sources, self.twin = [None] * len(units), None
        if variational == "sim":
            pass  # the similarity loss needs no feedback network
        elif feedback == "closed":
            sources = [ClosedForm(LinearFeedback(self.n_classes, u, l2=1.0 if l2 is None else l2,
                                                 decay=feedback_decay, dtype=self.dtype)) for u in units]
        elif feedback == "trained":
            sources = [Trained(TrainedLinearFeedback(self.n_classes, u, optimizer=optimizer, lr=fb_lr, rng=rng,
                                                     dtype=self.dtype, **opt_kw)) for u in units]
        else:
            self.twin = TwinFeedback(self.n_classes, units, optimizer=optimizer, lr=fb_lr, rng=rng,
                                     dtype=self.dtype, **opt_kw)
            sources = [TwinStage(self.twin, k) for k in range(len(units))]
        self.learners = [
            HiddenLearner(k, blk, opts[k], self.rule, term=term, source=sources[k], head=heads[k],
                          head_opt=head_opts[k], norm=LayerNorm(units[k], affine=False, dtype=self.dtype),
                          tokenwise=tokenwise[k])
            for k, blk in enumerate(self.blocks[:-1])]
        self.learners.append(OutputLearner(len(self.blocks) - 1, self.blocks[-1], opts[-1], self.rule))
        self.on_epoch_start(0)

    def mixing(self):
        """m for this epoch (constant ``m``, else m = 1 / (1 + tau epoch))."""
        return self.rule.mixing(self.epoch)

    def on_epoch_start(self, epoch):
        super().on_epoch_start(epoch)
        for learner in self.learners:
            learner.begin_epoch(epoch)

    # --- the sequential schedule --------------------------------------------------------------------
    def one_hot(self, y):
        """One-hot labels (N*, n_classes) as every learner's update takes them."""
        return one_hot(y, self.n_classes, dtype=self.dtype).reshape(-1, self.n_classes)

    def _move(self, device):
        for learner in self.learners:
            learner.to(device)
        if self.twin is not None:
            self.twin.to(device)

    def train_step(self, x, y):
        """One BLL step: every learner forwards with its pre-update weights (its input is the
        detached output of the learner below), then every learner updates from its own loss.
        With span 1 the updates are independent: any order, or a pipeline, gives the same result."""
        Y = self.one_hot(y)  # on the host: validates the labels once, before any copy to a GPU
        x, y, Y = self._batch(x), self._batch(y), self._batch(Y)
        # twin feedback: one top-down pass of the backward network before any stage updates
        b_fb = ([b.reshape(len(Y), -1) for b in self.twin.predict_all(Y, train=True)]
                if self.twin is not None else None)
        h = x
        for learner in self.learners:
            h = learner.forward(h)
        from_above = None
        for learner in reversed(self.learners):
            msg = b_fb[learner.k] if b_fb is not None and learner.k < len(b_fb) else None
            from_above = learner.update(y, Y, msg, from_above)
        return self.learners[-1].last_loss

    # --- diagnostics and state ---------------------------------------------------------------------
    def epoch_diagnostics(self, x, y):
        """Per block: mean local losses and ``|a|``, ``|b|`` over the epoch's steps; between-class variance
        fraction of the block output and the local head's accuracy on (x, y)."""
        blocks, _ = self.block_diagnostics(range(len(self.learners)), x, y)
        return self.diagnostics_record(blocks, self.out_loss())

    def block_diagnostics(self, ks, h, y):
        """(list, h): ``learner.diagnostics`` of learners ``ks`` (consecutive; the output learner has
        none) on their input ``h``, and the output of the last of them (an MPI stage runs its own
        learners on what the stage before sends: ``parallel.epoch_end``)."""
        h, out = self._batch(h), []
        for k in ks:
            if k < len(self.learners) - 1:
                d, h = self.learners[k].diagnostics(h, y)
                out.append(d)
        return out, h

    def out_loss(self) -> float:
        """The output learner's mean loss over the epoch's steps."""
        last = self.learners[-1].stats
        return float(last["out_loss"]) / max(float(last["steps"]), 1)

    def diagnostics_record(self, blocks, out_loss) -> dict:
        """``epoch_diagnostics``'s record from every block's diagnostics and the output loss."""
        return {"epoch": self.epoch, "m": self.mixing(), "blocks": blocks, "out_loss": out_loss}

    def aux_state(self) -> dict:
        """Heads and feedback weights (saved next to the model in checkpoints and exports)."""
        s = {}
        for learner in self.learners[:-1]:
            s.update(learner.head_aux())
        for learner in self.learners[:-1]:
            s.update(learner.feedback_aux())
        return s

    def state_dict(self) -> dict:
        """Every learner's state (block, head, feedback, optimisers, statistics), keyed learner<k>/."""
        return pack_states(self.learners)

    def load_state_dict(self, state):
        parts = unpack_states(state)
        unknown = sorted(set(parts) - {l.k for l in self.learners})
        if unknown:
            raise ValueError(f"BLL state has entries for learners {unknown[:4]}, the model has {len(self.learners)}")
        for l in self.learners:
            l.load_state_dict(parts.get(l.k, {}))
        self.epoch = self.learners[0].epoch
