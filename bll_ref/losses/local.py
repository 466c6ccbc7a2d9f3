"""Block-local variational losses, NumPy reference (the specification the kernels must match).

Notation of the papers (001 Eq. 7-9, 002 Eq. S7-S13): a block outputs the forward natural
parameter ``a`` (phi = a, forward message alpha = EF(phi)); the feedback network outputs ``b``;
the posterior rho = EF(gamma) has gamma = a + m b with the mixing parameter m (Eq. 9).

Conventions (every function here and in ``kernels``):

- arrays are (N, ...) with the batch first, float32 or float64; mixed inputs are promoted to the
  wider dtype; gradients come back in that dtype and in the input shape;
- every loss is the mean over the batch of the sum over units, returned as a Python float
  (elementwise terms in the input dtype, summed in float64);
- every gradient is the gradient of that mean, so it carries the 1/N;
- "gradient" means dL/dx of the loss L that is *minimised*; the papers print -dL/dtheta.

Signs: Eq. S7 as printed, <T (phi - gamma) - A(phi) + A(gamma)>_rho, is -KL(rho || alpha) (a sign
slip: log rho/alpha = T (gamma - phi) - A(gamma) + A(phi)). We use the non-negative KL,
A(phi) - A(gamma) - mu(gamma) (phi - gamma), whose gradient is exactly Eq. S8 / Eq. 7.

The printed Eq. 8 (and S12, S13) is *not* the gradient of KL(rho || alpha) when m != 1: it keeps
the unmixed b in the posterior weight. ``eq8_chain_rule_gap`` states the difference exactly.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .expfam import Bernoulli, Gaussian, Poisson, get_family

__all__ = [
    "kl", "ef_gradients", "kl_ef_gradients", "ef_chain_rule", "eq8_chain_rule_gap",
    "bernoulli_eq8", "gaussian_s12", "poisson_s13", "mixing",
    "gaussian_kl_s15", "uncertainty_metrics_s16_s17", "LOGVAR_BOUND",
]

#: Log-variances in ``gaussian_kl_s15`` and the S16/S17 metrics are clipped to +-LOGVAR_BOUND
#: (variances 2e-22 .. 5e21), so ``e^{-s} (mu* - mu)^2`` stays finite in float32 for ``|mu* - mu| <= 1e3``.
LOGVAR_BOUND = 50.0


# ----------------------------------------------------------------------------------- validation
def _as_float(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}; "
                         f"convert with np.asarray({name}, np.float32)")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with a batch of N >= 1 first, got {x.shape}")
    return x


def _check_arrays(names, *arrays):
    """Validate float dtype and equal (N, ...) shapes; promote to the common float dtype."""
    xs = [_as_float(x, n) for x, n in zip(arrays, names)]
    for x, n in zip(xs[1:], names[1:]):
        if x.shape != xs[0].shape:
            raise ValueError(f"{names[0]} and {n} must have the same shape (N, ...), "
                             f"got {xs[0].shape} and {x.shape}")
    dtype = np.result_type(*xs)
    return [x.astype(dtype, copy=False) for x in xs]


def _check_m(m) -> float:
    """The mixing parameter of Eq. 9, 0 <= m <= 1."""
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise ValueError(f"mixing parameter m must be a real number in [0, 1], got {m!r}") from None
    if not 0.0 <= m <= 1.0:  # also rejects NaN
        raise ValueError(f"mixing parameter m must be in [0, 1] (Eq. 9), got {m!r}")
    return m


def _underflow_ok(f):
    """Run f with float underflow ignored: e^{-|x|} and its products rounding to 0 (or to a
    subnormal) for large |x| are the intended values. Overflow, invalid and divide still raise
    under np.errstate(all="raise"); none of them occurs for |a|, |b| <= 1e3."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with np.errstate(under="ignore"):
            return f(*args, **kwargs)
    return wrapper


def _batch_mean(terms: np.ndarray) -> float:
    """Mean over the batch of the sum over units, accumulated in float64."""
    return _finite_loss(float(np.sum(terms, dtype=np.float64) / terms.shape[0]))


def _finite_loss(loss: float) -> float:
    """Raise on a non-finite loss: for finite inputs in the supported range it is always finite,
    and any NaN or inf among the inputs makes it non-finite (so this check costs no extra pass)."""
    if not math.isfinite(loss):
        raise ValueError(f"loss is {loss}: the inputs contain NaN or inf, or values far beyond the "
                         f"supported range |x| <= 1e3; check the block and feedback outputs")
    return loss


# ------------------------------------------------------------------------ general EF (Eq. 7, S7-S8)
@_underflow_ok
def kl(family, phi, gamma) -> float:
    """KL(rho || alpha) with rho = EF(gamma), alpha = EF(phi) (Eq. S7, sign corrected).

    Parameters
    ----------
    family : str or family object
        "bernoulli", "gaussian", "poisson" or an instance from ``expfam``.
    phi, gamma : ndarray, shape (N, ...), float32 or float64
        Forward and posterior natural parameters.

    Returns
    -------
    float
        mean_n sum_j [A(phi) - A(gamma) - mu(gamma) (phi - gamma)].
    """
    fam = get_family(family)
    phi, gamma = _check_arrays(("phi", "gamma"), phi, gamma)
    terms = fam.log_partition(phi) - fam.log_partition(gamma) - fam.mu(gamma) * (phi - gamma)
    return _batch_mean(terms)


def ef_gradients(family, phi, gamma):
    """Gradients of ``kl`` (Eq. 7 / S8): forward weight and posterior weight.

    Returns
    -------
    g_phi : ndarray, shape of phi
        dKL/dphi = -(mu(gamma) - mu(phi)) / N   (Eq. 7 "forward weight", sign flipped).
    g_gamma : ndarray, shape of phi
        dKL/dgamma = var(gamma) (gamma - phi) / N   (Eq. 7 "posterior weight", sign flipped).

    Notes
    -----
    For Poisson, gamma or phi above ``eta_max`` sit where the clipped family is flat; the formulas
    are then the gradients of the unclipped KL evaluated with clipped mu and var.
    """
    return kl_ef_gradients(family, phi, gamma)[1:]


@_underflow_ok
def kl_ef_gradients(family, phi, gamma):
    """``kl`` and ``ef_gradients`` together: (loss, g_phi, g_gamma). The fused kernel's twin."""
    fam = get_family(family)
    phi, gamma = _check_arrays(("phi", "gamma"), phi, gamma)
    n = phi.shape[0]
    mu_gamma = fam.mu(gamma)
    loss = _batch_mean(fam.log_partition(phi) - fam.log_partition(gamma) - mu_gamma * (phi - gamma))
    g_phi = -(mu_gamma - fam.mu(phi)) / n                 # Eq. 7: forward weight mu(rho) - mu(alpha)
    g_gamma = fam.var(gamma) * (gamma - phi) / n          # Eq. 7: posterior weight sigma^2(rho)(phi - gamma)
    return loss, g_phi, g_gamma


@_underflow_ok
def ef_chain_rule(family, a, b, m):
    """Exact gradients of KL(rho || alpha) with phi = a, gamma = a + m b (chain rule of Eq. 7).

    Returns (loss, g_a, g_b) with g_a = g_phi + g_gamma and g_b = m g_gamma. This is the
    variant that *is* gradient descent on the KL for every m; the printed Eq. 8 / S12 / S13 equal
    it only at m = 1.
    """
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    gamma = a + a.dtype.type(m) * b
    loss, g_phi, g_gamma = kl_ef_gradients(family, a, gamma)
    return loss, g_phi + g_gamma, a.dtype.type(m) * g_gamma


@_underflow_ok
def eq8_chain_rule_gap(family, a, b, m):
    """Printed estimator minus exact KL gradient: (d_a, d_b), each shaped like a.

    With gamma = a + m b, the exact gradient (``ef_chain_rule``) has posterior terms
    var(gamma) m b / N in g_a and var(gamma) m^2 b / N in g_b, whereas Eq. 8 (Bernoulli,
    var = rho (1 - rho)), S12 (Gaussian, var = s2) and S13 (Poisson, var = rho) print
    var(gamma) b / N in both places. The forward terms agree. So, exactly::

        printed g_a - chain g_a = (1 - m)   var(gamma) b / N
        printed g_b - chain g_b = (1 - m^2) var(gamma) b / N

    which vanishes at m = 1 (and only there, for b != 0).
    """
    fam = get_family(family)
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    n = a.shape[0]
    w = fam.var(a + a.dtype.type(m) * b) * b / n
    return a.dtype.type(1.0 - m) * w, a.dtype.type(1.0 - m * m) * w


# --------------------------------------------------------------------- printed special cases
@_underflow_ok
def bernoulli_eq8(a, b, m):
    """Eq. 8 with Eq. 9, exactly as printed.

    rho = S(a + m b), alpha = S(a); -dL/dtheta = (rho - alpha) da - rho (1 - rho) b (da + db).

    Parameters
    ----------
    a, b : ndarray, shape (N, ...), float32 or float64
        Forward (a = phi) and feedback (b) outputs of the block.
    m : float in [0, 1]
        Mixing parameter (see ``mixing``).

    Returns
    -------
    loss : float
        kl("bernoulli", a, a + m b).
    g_a : ndarray, shape of a
        (-(rho - alpha) + rho (1 - rho) b) / N.
    g_b : ndarray, shape of a
        rho (1 - rho) b / N.

    Notes
    -----
    At m = 1 this equals ``ef_chain_rule("bernoulli", a, b, 1)``; for m != 1 it differs by
    ``eq8_chain_rule_gap``: (1 - m) rho (1 - rho) b / N in g_a, (1 - m^2) rho (1 - rho) b / N in g_b.
    """
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    fam, n = Bernoulli(), a.shape[0]
    gamma = a + a.dtype.type(m) * b                # Eq. 9
    rho, alpha = fam.mu(gamma), fam.mu(a)
    post = fam.var(gamma) * b                      # Eq. 8 posterior weight rho (1 - rho) b, unmixed b
    g_a = (-(rho - alpha) + post) / n              # Eq. 8: forward weight (rho - alpha) on da
    g_b = post / n
    loss = _batch_mean(fam.log_partition(a) - fam.log_partition(gamma) - rho * (a - gamma))
    return loss, g_a, g_b


@_underflow_ok
def gaussian_s12(a, b, m, s2=1.0):
    """Eq. S11/S12 (Gaussian, known variance s2) in the form of Eq. 8.

    Printed S12 (m = 1 implied, gamma = a + b): -dL/dtheta = (1 - sigma) b da - sigma b db.
    S11 prints the forward weight as (gamma - phi), i.e. it takes the mean to *be* the natural
    parameter, which holds for s2 = 1 only, and writes sigma for the posterior weight
    sigma^2(rho) = s2. Reading (ambiguous print, so the Eq. 8 analogue through Eq. 7 is used):

        forward weight  mu(rho) - mu(alpha) = s2 (gamma - a),  gamma = a + m b
        posterior weight (Eq. 8 style, unmixed b)  s2 b

        g_a = (-(s2 gamma - s2 a) + s2 b) / N  = s2 (1 - m) b / N
        g_b = s2 b / N

    At s2 = 1 this is the printed S12 with m inserted like Eq. 9 ((1 - m) b, b) for every m. For
    s2 != 1 at m = 1 the print would give g_a = (s2 - 1) b / N where we give 0, the true
    gradient: KL between equal-variance Gaussians, s2 (m b)^2 / 2, does not depend on a.

    Returns (loss, g_a, g_b); loss = kl(Gaussian(s2), a, a + m b) = mean_n sum_j s2 (m b)^2 / 2.
    Differs from ``ef_chain_rule(Gaussian(s2), ...)`` by ``eq8_chain_rule_gap`` (var = s2).
    """
    m = _check_m(m)
    fam = Gaussian(s2)
    a, b = _check_arrays(("a", "b"), a, b)
    n = a.shape[0]
    gamma = a + a.dtype.type(m) * b
    mu_rho = fam.mu(gamma)
    fwd = mu_rho - fam.mu(a)                       # S11 forward weight, s2 (gamma - phi)
    post = fam.var(gamma) * b                      # S12 posterior weight sigma^2 b
    g_a = (-fwd + post) / n
    g_b = post / n
    loss = _batch_mean(fam.log_partition(a) - fam.log_partition(gamma) - mu_rho * (a - gamma))
    return loss, g_a, g_b


@_underflow_ok
def poisson_s13(a, b, m):
    """Eq. S13 (Poisson) in the form of Eq. 8, as printed with rho = e^{a + m b}, alpha = e^a.

    -dL/dtheta = (rho - alpha) da - rho b (da + db), the Poisson variance being rho itself:

        g_a = (-(rho - alpha) + rho b) / N,   g_b = rho b / N.

    S13 prints gamma = a + b; the mixing m enters as in Eq. 9 (the supplement's "replacing in
    Eq. S10" applies the same substitution). Natural parameters are clipped at
    ``Poisson().eta_max`` = 80 (see ``expfam``). Returns (loss, g_a, g_b); loss =
    kl("poisson", a, a + m b). Differs from ``ef_chain_rule`` by ``eq8_chain_rule_gap``.
    """
    m = _check_m(m)
    a, b = _check_arrays(("a", "b"), a, b)
    fam, n = Poisson(), a.shape[0]
    gamma = a + a.dtype.type(m) * b
    rho, alpha = fam.mu(gamma), fam.mu(a)
    post = rho * b                                 # S13 posterior weight sigma^2(rho) b = rho b
    g_a = (-(rho - alpha) + post) / n
    g_b = post / n
    loss = _batch_mean(fam.log_partition(a) - fam.log_partition(gamma) - rho * (a - gamma))
    return loss, g_a, g_b


def mixing(epoch, tau=0.5) -> float:
    """Mixing schedule m = 1 / (1 + tau M) for epoch index M = 0, 1, ... (001 Sec. 3.4, 002 p. 3).

    tau = 0.5 is the paper's default; tau = 0 gives constant m = 1.
    """
    try:
        epoch, tau = float(epoch), float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"mixing expects real epoch >= 0 and tau >= 0, got {epoch!r}, {tau!r}") from None
    if not (math.isfinite(epoch) and epoch >= 0):
        raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    return 1.0 / (1.0 + tau * epoch)


# ------------------------------------------------------------- uncertainty autoencoder (S15-S17)
@_underflow_ok
def gaussian_kl_s15(mu_pred, logvar_pred, target_mu, target_logvar):
    """Gaussian KL loss of the uncertainty autoencoder, Eq. S15.

    KL(target || predicted) = KL(N(mu*, e^{s*}) || N(mu, e^{s})), per element

        l = 1/2 (s - s* + (e^{s*} + (mu* - mu)^2) / e^{s} - 1),

    summed over units and averaged over the batch (S15's 1/M sum_n with M the batch size).

    Parameters
    ----------
    mu_pred, logvar_pred : ndarray, shape (N, ...)
        Network outputs mu_n and s_n (log-variances).
    target_mu, target_logvar : ndarray, same shape
        Targets mu*_n and s*_n (002 uses a constant s* for every pixel).

    Returns
    -------
    loss : float
    g_mu : ndarray
        dL/dmu = (mu - mu*) e^{-s} / N.
    g_logvar : ndarray
        dL/ds = (1 - (e^{s*} + (mu* - mu)^2) e^{-s}) / (2N); 0 where ``|s| > LOGVAR_BOUND``.

    Notes
    -----
    Computed in float64, returned in the dtype of the inputs. Log-variances are clipped to
    +-LOGVAR_BOUND (the loss is flat beyond, hence the zero gradient there).
    """
    mu, s, mu_t, s_t = _check_arrays(("mu_pred", "logvar_pred", "target_mu", "target_logvar"),
                                     mu_pred, logvar_pred, target_mu, target_logvar)
    dtype, n = mu.dtype, mu.shape[0]
    mu, mu_t = mu.astype(np.float64), mu_t.astype(np.float64)
    s64, s_t = s.astype(np.float64), np.clip(s_t.astype(np.float64), -LOGVAR_BOUND, LOGVAR_BOUND)
    s_c = np.clip(s64, -LOGVAR_BOUND, LOGVAR_BOUND)
    d = mu_t - mu
    inv_var = np.exp(-s_c)
    ratio = np.exp(s_t - s_c) + d * d * inv_var          # (e^{s*} + (mu* - mu)^2) / e^{s}
    loss = _batch_mean(0.5 * (s_c - s_t + ratio - 1.0))  # Eq. S15
    g_mu = -d * inv_var / n
    g_logvar = np.where(np.abs(s64) <= LOGVAR_BOUND, 0.5 * (1.0 - ratio), 0.0) / n
    return loss, g_mu.astype(dtype), g_logvar.astype(dtype)


@_underflow_ok
def uncertainty_metrics_s16_s17(mu_pred, logvar_pred, target_mu):
    """Uncertainty mismatch metrics of 002 (Fig. 2C of 001): (L_MM, L_ME), two floats.

    L_MM (Eq. S16, "MSE matching") = mean ((mu* - mu)^2 - e^{s})^2: how far the predicted
    variance is from the squared error actually made.
    L_ME (Eq. S17, "MSE estimator") = mean s: the mean predicted *log*-variance, as printed (the
    text calls it "mean variance").

    The printed 1/M sum_n is read as a mean over every predicted value (batch and units), so the
    numbers do not scale with the image size. Log-variances clipped to +-LOGVAR_BOUND in S16.
    """
    mu, s, mu_t = _check_arrays(("mu_pred", "logvar_pred", "target_mu"), mu_pred, logvar_pred, target_mu)
    mu, s, mu_t = mu.astype(np.float64), s.astype(np.float64), mu_t.astype(np.float64)
    err = (mu_t - mu) ** 2 - np.exp(np.clip(s, -LOGVAR_BOUND, LOGVAR_BOUND))
    return float(np.mean(err * err)), float(np.mean(s))
