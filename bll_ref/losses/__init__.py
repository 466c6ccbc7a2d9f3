"""Losses: exponential families, the paper's local estimators (NumPy reference), their fused
Numba kernels (``bll_ref.losses.kernels``, same signatures), optional numba.cuda kernels
(``bll_ref.losses.cuda``, imported on demand) and the output losses.

The names below are the NumPy reference (the specification); use ``kernels.<name>`` for speed.
"""
from . import expfam, kernels, local
from .expfam import Bernoulli, Gaussian, Poisson, bernoulli, gaussian, get_family, poisson
from .local import (
    LOGVAR_BOUND,
    bernoulli_eq8,
    ef_chain_rule,
    ef_gradients,
    eq8_chain_rule_gap,
    gaussian_kl_s15,
    gaussian_s12,
    kl,
    kl_ef_gradients,
    mixing,
    poisson_s13,
    uncertainty_metrics_s16_s17,
)
from .output import mse, softmax_cross_entropy

__all__ = [
    "expfam", "kernels", "local",
    "Bernoulli", "Gaussian", "Poisson", "bernoulli", "gaussian", "poisson", "get_family",
    "kl", "ef_gradients", "kl_ef_gradients", "ef_chain_rule", "eq8_chain_rule_gap",
    "bernoulli_eq8", "gaussian_s12", "poisson_s13", "mixing",
    "gaussian_kl_s15", "uncertainty_metrics_s16_s17", "LOGVAR_BOUND",
    "softmax_cross_entropy", "mse",
]
