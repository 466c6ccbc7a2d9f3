"""Exponential families used by the local estimators (Eq. 6 of 001, Eq. S5/S6 of 002).

A family is a small frozen dataclass with three elementwise functions of the natural parameter
``eta`` (any shape, float32 or float64; the result has the dtype of ``eta``):

- ``mu(eta)``            mean of the sufficient statistic, mu = A'(eta)
- ``var(eta)``           its variance, sigma^2 = A''(eta) (the "posterior weight" of Eq. 7)
- ``log_partition(eta)`` A(eta)

==================  ==============  =============  =================  ============
family              mu              var            A                  paper
==================  ==============  =============  =================  ============
``Bernoulli()``     S(eta)          mu (1 - mu)    log(1 + e^eta)     Eq. S9, S10
``Gaussian(s2=1)``  s2 eta          s2             s2 eta^2 / 2       Eq. S11, S12
``Poisson()``       e^eta           e^eta          e^eta              Eq. S13
==================  ==============  =============  =================  ============

``Gaussian`` has a known (constant) variance ``s2`` and sufficient statistic T(z) = z, so its
natural parameter is eta = mean / s2. At s2 = 1 the natural parameter is the mean, which is how
Eq. S11 is printed ("<T(z)>_rho = phi").

Numerics: every function is finite and warning-free (no overflow, invalid or divide) for
``|eta| <= 1e3`` in float32 and float64. ``exp`` is only ever taken of ``-|eta|`` (which may underflow
to 0: that is the correct value, and the underflow flag is silenced locally), except in
``Poisson``, which clips eta at ``Poisson.eta_max`` (default 80) before exponentiating: e^80 =
5.5e34, so mu, var and A stay finite and var * (gamma - phi) stays below float32's maximum
(3.4e38) for ``|gamma - phi| <= 6e3``. Beyond eta_max the Poisson functions are constant (their
derivative there is 0); the local estimators document this where it matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["Bernoulli", "Gaussian", "Poisson", "bernoulli", "gaussian", "poisson", "get_family"]


def _float_array(eta) -> np.ndarray:
    eta = np.asarray(eta)
    if eta.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected float32 or float64 natural parameters, got dtype {eta.dtype}; "
                         f"convert with np.asarray(x, np.float32)")
    return eta


def _exp_neg_abs(eta: np.ndarray) -> np.ndarray:
    """``e^{-|eta|}`` in (0, 1]; underflow to 0 for large ``|eta|`` is the intended value."""
    with np.errstate(under="ignore"):
        return np.exp(-np.abs(eta))


@dataclass(frozen=True)
class Bernoulli:
    """Bernoulli units, z in {0, 1}: mu = S(eta), var = mu (1 - mu), A = log(1 + e^eta) (Eq. S9)."""

    name: ClassVar[str] = "bernoulli"

    def mu(self, eta):
        """Logistic sigmoid S(eta) = 1 / (1 + e^{-eta}), written with ``e = e^{-|eta|}`` so it never overflows."""
        eta = _float_array(eta)
        e = _exp_neg_abs(eta)
        return np.where(eta >= 0, 1, e).astype(eta.dtype, copy=False) / (1 + e)

    def var(self, eta):
        """S(eta) S(-eta) = e / (1 + e)^2 with ``e = e^{-|eta|}``.

        Computed from eta, not as mu (1 - mu): 1 - mu cancels to 0 once mu rounds to 1.
        """
        eta = _float_array(eta)
        e = _exp_neg_abs(eta)
        return e / ((1 + e) * (1 + e))

    def log_partition(self, eta):
        """Softplus log(1 + e^eta) = ``max(eta, 0) + log1p(e^{-|eta|})``."""
        eta = _float_array(eta)
        return np.maximum(eta, 0) + np.log1p(_exp_neg_abs(eta))


@dataclass(frozen=True)
class Gaussian:
    """Gaussian units with known variance ``s2``: mu = s2 eta, var = s2, A = s2 eta^2 / 2 (Eq. S11)."""

    s2: float = 1.0
    name: ClassVar[str] = "gaussian"

    def __post_init__(self):
        s2 = float(self.s2)
        if not (np.isfinite(s2) and s2 > 0):
            raise ValueError(f"Gaussian variance s2 must be a finite positive number, got {self.s2!r}")
        object.__setattr__(self, "s2", s2)

    def mu(self, eta):
        eta = _float_array(eta)
        return eta.dtype.type(self.s2) * eta

    def var(self, eta):
        eta = _float_array(eta)
        return np.full_like(eta, self.s2)

    def log_partition(self, eta):
        eta = _float_array(eta)
        return eta.dtype.type(0.5 * self.s2) * (eta * eta)


@dataclass(frozen=True)
class Poisson:
    """Poisson units, z in {0, 1, 2, ...}: mu = var = A = e^eta (Eq. S13), eta clipped at ``eta_max``.

    The clip (default 80, at most 88 so that e^eta_max is finite in float32) keeps every quantity
    finite for ``|eta|`` up to 1e3; see the module docstring.
    """

    eta_max: float = 80.0
    name: ClassVar[str] = "poisson"

    def __post_init__(self):
        eta_max = float(self.eta_max)
        if not (0 < eta_max <= 88.0):
            raise ValueError(f"Poisson eta_max must be in (0, 88] (e^88 is near float32's maximum), "
                             f"got {self.eta_max!r}")
        object.__setattr__(self, "eta_max", eta_max)

    def _exp(self, eta):
        eta = _float_array(eta)
        with np.errstate(under="ignore"):
            return np.exp(np.minimum(eta, eta.dtype.type(self.eta_max)))

    def mu(self, eta):
        return self._exp(eta)

    def var(self, eta):
        return self._exp(eta)

    def log_partition(self, eta):
        return self._exp(eta)


bernoulli = Bernoulli()
gaussian = Gaussian()
poisson = Poisson()

_BY_NAME = {"bernoulli": bernoulli, "gaussian": gaussian, "poisson": poisson}


def get_family(family):
    """The family object for a name ("bernoulli", "gaussian", "poisson") or a family instance.

    Raises ValueError for anything else.
    """
    if isinstance(family, (Bernoulli, Gaussian, Poisson)):
        return family
    if isinstance(family, str) and family.lower() in _BY_NAME:
        return _BY_NAME[family.lower()]
    raise ValueError(f"unknown exponential family {family!r}; expected one of {sorted(_BY_NAME)} "
                     f"or an instance of Bernoulli, Gaussian(s2), Poisson(eta_max)")
