"""The local variational terms of a hidden block learner: one class per term (methods/bll.py's
module docstring has the mathematics). Every term has the same interface:

    loss, g_a, g_b, abs_b = term.grads(learner, a, Y, b_fb)   # the term on the pre-activation a
    dh = term.on_output(learner, h, Y, dh)                     # a term on the block output h
    term.uses_feedback                                         # False: no message source at all

g_b (dL/db) is computed only when the learner's message source trains (``source.trains``);
a solved (closed-form) source gets None. ``OPTIONS`` names the BLL options the term accepts
besides the feedback source's (``BLL`` refuses the others).
"""
from __future__ import annotations

from .. import backend
from ..losses import kernels, local, predsim

__all__ = ["mean_abs", "loss_kernels", "NoTerm", "Similarity", "GaussianLN", "Gaussian", "Eq8", "BernoulliKL", "TERMS"]


def mean_abs(x):
    """mean ``|x|``: a float on the CPU, a device scalar on the GPU (read once per epoch, not per step)."""
    m = backend.array_module(x).abs(x).mean()
    return m if backend.is_device_array(m) else float(m)


def loss_kernels(rule, x):
    """The module whose local-loss functions take ``x``: the numba.cuda kernels for a GPU array,
    else the fused Numba kernels or the NumPy reference (``rule.use_kernels``)."""
    if backend.is_device_array(x):
        return backend.loss_kernels_gpu()
    return kernels if rule.use_kernels else local


def _units(learner, a):
    """a as (samples, units): token-wise for sequences, flattened per example otherwise."""
    return a.reshape(-1, a.shape[-1]) if learner.tokenwise else a.reshape(len(a), -1)


class NoTerm:
    """``"none"``: the predictive head alone (the ablation); no feedback network."""

    name, uses_feedback = "none", False
    OPTIONS = frozenset()

    def grads(self, learner, a, Y, b_fb):
        return 0.0, None, None, 0.0

    def on_output(self, learner, h, Y, dh):
        return dh


class Similarity(NoTerm):
    """``"sim"``: Pred-Sim's similarity-matching loss (Nøkland & Eidnes 2019, ``losses/predsim.py``)
    on the block output h, weighted by var_weight; no feedback network, no mixing."""

    name = "sim"
    OPTIONS = frozenset({"var_weight"})

    def on_output(self, learner, h, Y, dh):
        feats = h.reshape(-1, h.shape[-1]) if learner.tokenwise else h
        loss, g = predsim.sim_loss(feats, Y)
        g = g.reshape(h.shape) * learner.dtype.type(learner.rule.var_weight)
        learner.stats["var_loss"] += learner.rule.var_weight * loss
        return g if dh is None else dh + g


class GaussianLN(NoTerm):
    """``"gauss_ln"`` (default): Gaussian family, known variance 1, on z = LN(a) (layer norm over
    the block's units, no affine); the message b is fitted to z. Eq. 7 / S8 with gamma := b:
    g_z = -(mu(b) - mu(z)) / (N D) (the 1/D makes it a mean over units)."""

    name, uses_feedback = "gauss_ln", True
    OPTIONS = frozenset({"var_weight", "tau", "m", "anneal"})
    normalise = True

    def grads(self, learner, a, Y, b_fb):
        rule, source = learner.rule, learner.source
        A = _units(learner, a)
        w = rule.var_weight * (learner.mixing() if rule.anneal else 1.0)
        z = learner.norm.forward(A, train=True) if self.normalise else A
        b = source.message(Y, z, b_fb)
        D = z.shape[1]
        loss, g_z, g_b = loss_kernels(rule, z).kl_ef_gradients("gaussian", z, b)
        scale = learner.dtype.type(w / D)
        g_A = g_z * scale
        if self.normalise:
            g_A = learner.norm.backward(g_A)
        g_b = g_b * scale if source.trains else None
        return w * loss / D, g_A.reshape(a.shape), g_b, mean_abs(b)


class Gaussian(GaussianLN):
    """``"gauss"``: the same on the raw a (the peer's collapsing variant, kept for comparison)."""

    name, normalise = "gauss", False


class Eq8(NoTerm):
    """``"eq8"``: Bernoulli, Eq. 8/9 as printed: rho = S(a + m b), alpha = S(a),
    g_a = -(rho - alpha) [forward weight] + rho (1 - rho) b [posterior weight = g_b];
    ``eq8_terms`` keeps either weight alone."""

    name, uses_feedback = "eq8", True
    OPTIONS = frozenset({"var_weight", "tau", "m", "eq8_terms"})

    def grads(self, learner, a, Y, b_fb):
        rule, source = learner.rule, learner.source
        A = _units(learner, a)
        b = source.message(Y, A, b_fb)
        loss, g_a, g_b = self._grads(rule, A, b, learner.mixing())
        scale = learner.dtype.type(rule.var_weight)
        g_b = g_b * scale if source.trains else None
        return rule.var_weight * loss, (g_a * scale).reshape(a.shape), g_b, mean_abs(b)

    def _grads(self, rule, A, b, m):
        loss, g_a, g_b = loss_kernels(rule, A).bernoulli_eq8(A, b, m)
        if "posterior" not in rule.eq8_terms:
            g_a = g_a - g_b
        if "forward" not in rule.eq8_terms:
            g_a = g_b.copy()
        return loss, g_a, g_b


class BernoulliKL(Eq8):
    """``"bernoulli_kl"``: the exact gradient of KL(rho || alpha), gamma = a + m b (Eq. 7 chain
    rule): g_a = g_phi + g_gamma, g_b = m g_gamma."""

    name = "bernoulli_kl"
    OPTIONS = frozenset({"var_weight", "tau", "m"})

    def _grads(self, rule, A, b, m):
        loss, g_phi, g_gamma = loss_kernels(rule, A).kl_ef_gradients("bernoulli", A, A + m * b)
        return loss, g_phi + g_gamma, m * g_gamma


TERMS = {cls.name: cls for cls in (GaussianLN, Gaussian, Eq8, BernoulliKL, NoTerm, Similarity)}
