"""Fixed-point (Q-format) quantisation, integer ops, and integer-only reference inference.

A value x is stored as an integer *code* q with x ~= q * 2**-frac.  A :class:`QFormat` is the
hls4ml / Vivado-HLS type ``ap_fixed<W, I, Q, O>`` (``ap_ufixed`` when unsigned) with

    W = width,  I = width - frac (integer bits incl. sign),
    rounding  "floor" = AP_TRN (toward -inf), "nearest" = AP_RND (half toward +inf),
              "nearest_even" = AP_RND_CONV (half to even),
    overflow  "saturate" = AP_SAT, "wrap" = AP_WRAP (two's complement, keep the low W bits).

Everything after :func:`quantize` is integer arithmetic on int64 (what a firmware engineer
writes in C): products accumulate in int64, :func:`round_shift` rescales with the chosen
rounding, :func:`overflow` saturates or wraps to the width.  :func:`compile_integer` turns a
float model (a ``Sequential`` of blocks) into an :class:`IntegerModel` whose layer *records* are
plain data (JSON-able ``attrs`` + a dict of integer ``arrays``), so an exporter can write them
and :meth:`IntegerModel.from_records` rebuilds the same bit-exact inference from them alone.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "QFormat", "quantize", "dequantize", "round_shift", "overflow", "requantize",
    "calibrate_weight", "calibrate_activation", "fold_batchnorm", "IntegerModel",
    "compile_integer", "ROUNDING_MODES", "OVERFLOW_MODES", "RECORD_KINDS",
]

ROUNDING_MODES = ("floor", "nearest", "nearest_even")
OVERFLOW_MODES = ("saturate", "wrap")
_FRAC_MIN, _FRAC_MAX = -64, 64          # keeps 2**frac and 2**-frac exact float64 numbers
_HLS_Q = {"floor": "AP_TRN", "nearest": "AP_RND", "nearest_even": "AP_RND_CONV"}
_HLS_O = {"saturate": "AP_SAT", "wrap": "AP_WRAP"}
_TINY_NEG = -np.nextafter(0.0, 1.0)     # -5e-324: keeps the sign of an underflowed product


# ------------------------------------------------------------------------------------------------
# Q-format
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QFormat:
    """Fixed-point format: ``width`` bits, ``frac`` fractional bits, rounding and overflow modes.

    Equivalent hls4ml type: ``ap_fixed<width, width - frac, Q, O>`` (see :attr:`hls_type`).
    ``frac`` may exceed ``width`` (tiny values) or be negative (large values), as in ap_fixed.

    Parameters
    ----------
    width : int, 2..32
    frac : int, -64..64
    signed : bool
        two's complement codes in [-2**(width-1), 2**(width-1) - 1]; unsigned: [0, 2**width - 1]
    rounding : "floor" | "nearest" | "nearest_even"
    overflow : "saturate" | "wrap"
    """

    width: int
    frac: int
    signed: bool = True
    rounding: str = "nearest"
    overflow: str = "saturate"

    def __post_init__(self):
        for name in ("width", "frac"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"QFormat.{name} must be an int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not 2 <= self.width <= 32:
            raise ValueError(f"QFormat.width must be in 2..32, got {self.width}")
        if not _FRAC_MIN <= self.frac <= _FRAC_MAX:
            raise ValueError(f"QFormat.frac must be in {_FRAC_MIN}..{_FRAC_MAX}, got {self.frac}")
        if not isinstance(self.signed, (bool, np.bool_)):
            raise ValueError(f"QFormat.signed must be a bool, got {self.signed!r}")
        object.__setattr__(self, "signed", bool(self.signed))
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"QFormat.rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"QFormat.overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")

    @property
    def min_code(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def max_code(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def code_dtype(self) -> np.dtype:
        """Smallest of int8/int16/int32 (uint8/16/32 when unsigned) that holds ``width`` bits."""
        bits = 8 if self.width <= 8 else 16 if self.width <= 16 else 32
        return np.dtype(f"{'int' if self.signed else 'uint'}{bits}")

    @property
    def step(self) -> float:
        """Value of one code step, 2**-frac."""
        return math.ldexp(1.0, -self.frac)

    @property
    def int_bits(self) -> int:
        """ap_fixed's I = width - frac (includes the sign bit when signed)."""
        return self.width - self.frac

    @property
    def hls_type(self) -> str:
        """The hls4ml / Vivado-HLS spelling, e.g. ``ap_fixed<8,3,AP_RND,AP_SAT>``."""
        base = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{base}<{self.width},{self.int_bits},{_HLS_Q[self.rounding]},{_HLS_O[self.overflow]}>"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "QFormat":
        if isinstance(d, QFormat):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"QFormat.from_dict expects a dict, got {type(d).__name__}")
        keys = {"width", "frac", "signed", "rounding", "overflow"}
        missing, extra = keys - set(d), set(d) - keys
        if "width" in missing or "frac" in missing or extra:
            raise ValueError(f"QFormat dict needs keys {sorted(keys)} (signed/rounding/overflow "
                             f"optional); missing {sorted(missing)}, unexpected {sorted(extra)}")
        return cls(**{k: (bool(v) if k == "signed" else str(v) if k in ("rounding", "overflow") else v)
                      for k, v in d.items()})


def _check_fmt(fmt, who):
    if not isinstance(fmt, QFormat):
        raise ValueError(f"{who} expects a QFormat, got {type(fmt).__name__}")
    return fmt


def _as_int64(a, who) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{who} expects integer codes, got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{who}: uint64 codes above 2**63 - 1 do not fit the int64 accumulator")
    return a.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------------
# float <-> code
# ------------------------------------------------------------------------------------------------
def _round_float(v, rounding):
    """Round float64 integers-to-be exactly.  v - floor(v) is exact for |v| >= 1 and for
    0 <= v < 1; for -1 < v < 0 it may round, but monotonically, so the test ``>= 0.5`` is exact
    (a naive floor(v + 0.5) fails at v = 0.49999999999999994 and above 2**52)."""
    if rounding == "floor":
        return np.floor(v)
    if rounding == "nearest":
        fl = np.floor(v)
        with np.errstate(invalid="ignore"):   # inf - inf for overflowed products
            return fl + (v - fl >= 0.5)
    return np.rint(v)                          # IEEE round-half-even = AP_RND_CONV


def quantize(x, fmt: QFormat) -> np.ndarray:
    """Float -> integer codes: overflow(round(x * 2**frac)).

    Exact for float16/32/64 input: the scaling by 2**frac is exact (an underflowed negative
    product keeps its sign) and the rounding is done in float64 without a lossy ``+ 0.5``.

    Parameters
    ----------
    x : array_like of float, any shape, finite
    fmt : QFormat

    Returns
    -------
    codes : ndarray, same shape as x, dtype ``fmt.code_dtype``, values in [min_code, max_code]
    """
    _check_fmt(fmt, "quantize")
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("quantize expects finite values, got NaN or inf; clean the input first")
    with np.errstate(over="ignore", under="ignore"):
        v = np.ldexp(x, fmt.frac)
    v = np.where((v == 0) & (x < 0), _TINY_NEG, v)
    r = _round_float(v, fmt.rounding)
    if fmt.overflow == "saturate":
        out = np.clip(r, fmt.min_code, fmt.max_code)
    else:
        # |x * 2**frac| >= 2**1024 is a multiple of 2**width, so it wraps to 0; np.mod is exact.
        r = np.where(np.isinf(r), 0.0, r)
        m = np.mod(r, float(1 << fmt.width))
        out = np.where(m > fmt.max_code, m - float(1 << fmt.width), m) if fmt.signed else m
    return out.astype(np.int64).astype(fmt.code_dtype)


def dequantize(codes, fmt: QFormat) -> np.ndarray:
    """Integer codes -> float64 values codes * 2**-frac (exact)."""
    _check_fmt(fmt, "dequantize")
    return np.ldexp(_as_int64(codes, "dequantize").astype(np.float64), -fmt.frac)


# ------------------------------------------------------------------------------------------------
# integer ops
# ------------------------------------------------------------------------------------------------
def round_shift(acc, shift: int, rounding: str = "floor") -> np.ndarray:
    """Arithmetic right shift of int64 ``acc`` by ``shift`` bits with rounding: acc / 2**shift.

    floor        : acc >> shift
    nearest      : (acc + 2**(shift-1)) >> shift   (half toward +inf; computed as
                   q + (r >= half) with q = acc >> shift, r = acc & (2**shift - 1), so it cannot
                   overflow near 2**63)
    nearest_even : q + (r > half or (r == half and q odd))

    ``shift == 0`` returns a copy; a negative shift is an exact left shift (ValueError if the
    result leaves int64).  Shifts of 64 and more give what the exact division gives (0 or -1).

    Returns int64 of the shape of ``acc``.
    """
    acc = _as_int64(acc, "round_shift")
    shift = operator.index(shift)
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"round_shift: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if shift == 0:
        return acc.copy()
    if shift < 0:
        s = -shift
        if s >= 63:
            if np.any(acc != 0):
                raise ValueError(f"round_shift: left shift by {s} overflows int64")
            return acc.copy()
        out = np.left_shift(acc, s)
        if np.any(np.right_shift(out, s) != acc):
            raise ValueError(f"round_shift: left shift by {s} overflows int64 for |acc| up to "
                             f"{int(np.abs(acc).max())}")
        return out
    if shift >= 64:   # acc / 2**shift lies in [-0.5, 0.5)
        return np.where(acc < 0, -1, 0).astype(np.int64) if rounding == "floor" else np.zeros_like(acc)
    q = np.right_shift(acc, shift)
    if rounding == "floor":
        return q
    r = np.bitwise_and(acc, np.int64((1 << shift) - 1))
    half = np.int64(1 << (shift - 1))
    if rounding == "nearest":
        return q + (r >= half)
    return q + ((r > half) | ((r == half) & (np.bitwise_and(q, 1) == 1)))


def overflow(codes, fmt: QFormat) -> np.ndarray:
    """Saturate (clip to [min_code, max_code]) or wrap (keep the low ``width`` bits, two's
    complement) int64 ``codes`` to ``fmt``.  Returns int64."""
    _check_fmt(fmt, "overflow")
    c = _as_int64(codes, "overflow")
    if fmt.overflow == "saturate":
        return np.clip(c, fmt.min_code, fmt.max_code)
    m = np.bitwise_and(c, np.int64((1 << fmt.width) - 1))
    return np.where(m > fmt.max_code, m - (1 << fmt.width), m) if fmt.signed else m


def requantize(acc, acc_frac: int, fmt: QFormat) -> np.ndarray:
    """int64 accumulator with ``acc_frac`` fractional bits -> codes of ``fmt``:
    overflow(round_shift(acc, acc_frac - fmt.frac, fmt.rounding)) cast to ``fmt.code_dtype``.

    When ``fmt.frac > acc_frac`` the left shift is done overflow-safely (saturate: a value that
    would leave int64 saturates anyway; wrap: only the low ``width`` bits matter)."""
    _check_fmt(fmt, "requantize")
    acc = _as_int64(acc, "requantize")
    shift = operator.index(acc_frac) - fmt.frac
    if shift >= 0:
        r = round_shift(acc, shift, fmt.rounding)
    elif fmt.overflow == "saturate":
        s = min(-shift, 40)                   # 2**40 > any max_code: larger shifts saturate alike
        lim = 1 << (62 - s)
        r = np.left_shift(np.clip(acc, -lim, lim), s)
    else:
        s = -shift
        if s >= fmt.width:
            r = np.zeros_like(acc)
        else:
            r = np.left_shift(np.bitwise_and(acc, np.int64((1 << fmt.width) - 1)), s)
    return overflow(r, fmt).astype(fmt.code_dtype)


def _quantize_int64(x, frac, rounding, who):
    """Float -> int64 codes at ``frac`` with no width limit (bias aligned to an accumulator)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        v = np.ldexp(x, frac)
    v = np.where((v == 0) & (x < 0), _TINY_NEG, v)
    r = _round_float(v, rounding)
    if np.any(np.abs(r) >= 2.0 ** 62):
        raise ValueError(f"{who}: values up to {np.abs(x).max():g} at {frac} fractional bits do "
                         "not fit an int64 accumulator; the layer's input or weight range is degenerate")
    return r.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def _ldexp(v, e):
    try:
        return math.ldexp(v, e)
    except OverflowError:
        return math.copysign(math.inf, v)


def _fit_frac(lo, hi, width, signed):
    """Largest frac in [-64, 64] with lo * 2**frac >= min_code and hi * 2**frac <= max_code."""
    proto = QFormat(width, 0, signed)
    if not signed:
        lo = 0.0                                 # negative values saturate to 0 in unsigned formats
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if lo == 0.0 and hi == 0.0:                  # all zero: any frac is exact; use the unit range
        return width - 1 if signed else width

    def fits(f):
        return _ldexp(hi, f) <= proto.max_code and _ldexp(lo, f) >= proto.min_code

    f = (width - 1 if signed else width) - math.frexp(max(hi, -lo))[1]
    f = min(max(f, _FRAC_MIN), _FRAC_MAX)
    while f < _FRAC_MAX and fits(f + 1):
        f += 1
    while f > _FRAC_MIN and not fits(f):
        f -= 1
    return f


def _finite_array(x, who):
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise ValueError(f"{who} expects a non-empty array")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{who} expects finite values, got NaN or inf")
    return x


def calibrate_weight(w, width: int, *, signed=True, rounding="nearest", overflow="saturate") -> QFormat:
    """Per-tensor power-of-two format for weights: the largest ``frac`` such that every element
    of ``w`` lies in [min_code, max_code] * 2**-frac (no saturation, whatever the rounding).
    The negative side uses the full -2**(width-1) (e.g. w in [-1, 0.5] gets frac = width - 1).
    An all-zero tensor gets frac = width - 1 (any frac represents it exactly)."""
    w = _finite_array(w, "calibrate_weight")
    frac = _fit_frac(w.min(), w.max(), int(width), signed)
    return QFormat(width, frac, signed, rounding, overflow)


def calibrate_activation(x, width: int, percentile: float = 100.0, *, signed=True,
                         rounding="nearest", overflow="saturate") -> QFormat:
    """Per-tensor format from a calibration batch: with m = percentile(|x|, ``percentile``), fit
    the range [max(min x, -m), min(max x, m)] as :func:`calibrate_weight` does.  percentile=100
    fits every calibration value; lower values clip outliers (they saturate at run time)."""
    x = _finite_array(x, "calibrate_activation")
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"calibrate_activation: percentile must be in (0, 100], got {percentile}")
    m = float(np.percentile(np.abs(x), percentile))
    lo, hi = max(float(x.min()), -m), min(float(x.max()), m)
    return QFormat(width, _fit_frac(lo, hi, int(width), signed), signed, rounding, overflow)


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


# ------------------------------------------------------------------------------------------------
# integer kernels (shared by IntegerModel.run; float twins used for calibration)
# ------------------------------------------------------------------------------------------------
def _matmul_int(a, b):
    """Exact int64 a @ b.  Uses float64 BLAS when every partial sum is provably an integer below
    2**53 (then the float result is exact), else numpy's int64 matmul."""
    k = a.shape[-1]
    amax = int(np.abs(a).max()) if a.size else 0
    bmax = int(np.abs(b).max()) if b.size else 0
    bound = k * amax * bmax
    if bound < 2 ** 53:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    if bound >= 2 ** 62:
        raise ValueError(f"integer matmul: |partial sums| up to {bound} could overflow int64")
    return a @ b


def _pair(v):
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _im2col(x, kh, kw, stride, padding):
    """(N, C, H, W) -> cols (N*Ho*Wo, C*kh*kw) in (c, i, j) order, Ho, Wo (zero padding)."""
    (sh, sw), (ph, pw) = stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    if x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"conv/pool window {kh}x{kw} larger than the padded input {x.shape[2:]}")
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]   # (N,C,Ho,Wo,kh,kw)
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw), ho, wo


def _conv(x, W, stride, padding, matmul):
    n = x.shape[0]
    o, _, kh, kw = W.shape
    cols, ho, wo = _im2col(x, kh, kw, stride, padding)
    y = matmul(cols, W.reshape(o, -1).T)
    return y.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def _windows(x, kernel, stride):
    (kh, kw), (sh, sw) = kernel, stride
    if x.ndim != 4 or x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"pooling {kh}x{kw} expects (N, C, H, W) with H >= {kh}, W >= {kw}, got {x.shape}")
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _channel_shape(ndim):
    return (1, -1) + (1,) * (ndim - 2)


def _avg_reciprocal(k):
    """recip = round(2**30 / k) (half up, integer arithmetic); exact when k is a power of two."""
    return ((1 << 31) // k + 1) // 2, 30


# ------------------------------------------------------------------------------------------------
# records: the plain-data description of the integer model
# ------------------------------------------------------------------------------------------------
# kind -> (number of inputs, required attrs, required arrays {name: ndim})
_SPEC = {
    "input": (0, ("shape",), {}),
    "dense": (1, ("w_fmt", "acc_frac"), {"W": 2, "c": 1}),
    "conv2d": (1, ("w_fmt", "acc_frac", "stride", "padding"), {"W": 4, "c": 1}),
    "scale": (1, ("w_fmt", "acc_frac"), {"W": 1, "c": 1}),
    "relu": (1, (), {}),
    "leaky_relu": (1, ("slope_code", "slope_frac"), {}),
    "maxpool2d": (1, ("kernel_size", "stride"), {}),
    "avgpool2d": (1, ("kernel_size", "stride", "recip", "recip_shift"), {}),
    "flatten": (1, (), {}),
    "add": (2, (), {}),
    "lut": (1, ("index_offset",), {"table": 1}),
}
RECORD_KINDS = tuple(_SPEC)


def _json_default(v):
    """numpy scalars / small arrays (e.g. attributes read back from HDF5) -> Python values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"record attribute of type {type(v).__name__} is not JSON-able")


def _validate_record(i, rec, fmts):
    where = f"record {i}"
    if not isinstance(rec, dict) or not isinstance(rec.get("attrs"), dict):
        raise ValueError(f"{where}: expected a dict with 'attrs' (dict) and 'arrays' (dict)")
    attrs, arrays = rec["attrs"], rec.get("arrays", {})
    if not isinstance(arrays, dict):
        raise ValueError(f"{where}: 'arrays' must be a dict of numpy arrays")
    kind = attrs.get("kind")
    if kind not in _SPEC:
        raise ValueError(f"{where}: unknown kind {kind!r}; known: {list(_SPEC)}")
    where = f"record {i} ({kind} {attrs.get('name', '?')!r})"
    if (i == 0) != (kind == "input"):
        raise ValueError(f"{where}: the first record, and only it, must be the 'input' record")
    n_in, req_attrs, req_arrays = _SPEC[kind]
    inputs = attrs.get("inputs")
    if (not isinstance(inputs, (list, tuple)) or len(inputs) != n_in
            or any(not isinstance(j, (int, np.integer)) or not 0 <= j < i for j in inputs)):
        raise ValueError(f"{where}: 'inputs' must list {n_in} indices of earlier records, got {inputs!r}")
    for k in ("name", "out_fmt") + req_attrs:
        if k not in attrs:
            raise ValueError(f"{where}: missing attribute {k!r}")
    out_fmt = QFormat.from_dict(attrs["out_fmt"])
    clean = {}
    for k, nd in req_arrays.items():
        if k not in arrays:
            raise ValueError(f"{where}: missing array {k!r}")
        a = np.array(arrays[k])                      # copy: never alias a caller's / file's buffer
        if a.ndim != nd or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: array {k!r} must be a {nd}-d integer array, got {a.shape} {a.dtype}")
        clean[k] = a
    for k, a in arrays.items():                      # informational arrays (float twins) kept
        if k not in clean:
            clean[k] = np.array(a)
    in_fmts = [fmts[j] for j in inputs]
    if kind in ("dense", "conv2d", "scale"):
        w_fmt = QFormat.from_dict(attrs["w_fmt"])
        W, c = clean["W"], clean["c"]
        n_out = W.shape[1] if kind == "dense" else W.shape[0]
        if c.shape != (n_out,):
            raise ValueError(f"{where}: bias c must have shape ({n_out},), got {c.shape}")
        if W.size and (W.min() < w_fmt.min_code or W.max() > w_fmt.max_code):
            raise ValueError(f"{where}: weight codes outside {w_fmt.hls_type}")
        if int(attrs["acc_frac"]) != in_fmts[0].frac + w_fmt.frac:
            raise ValueError(f"{where}: acc_frac {attrs['acc_frac']} != input frac "
                             f"{in_fmts[0].frac} + weight frac {w_fmt.frac}")
        clean["W"], clean["c"] = W.astype(w_fmt.code_dtype), c.astype(np.int64)
    if kind == "lut":
        n = 1 << in_fmts[0].width
        if clean["table"].shape != (n,) or int(attrs["index_offset"]) != in_fmts[0].min_code:
            raise ValueError(f"{where}: table must have 2**{in_fmts[0].width} = {n} entries indexed "
                             f"from code {in_fmts[0].min_code}, got {clean['table'].shape}")
        t = clean["table"]
        if t.min() < out_fmt.min_code or t.max() > out_fmt.max_code:
            raise ValueError(f"{where}: table codes outside {out_fmt.hls_type}")
    if kind in ("relu", "leaky_relu", "maxpool2d", "avgpool2d", "flatten") and out_fmt != in_fmts[0]:
        raise ValueError(f"{where}: out_fmt must equal the input format for {kind}")
    attrs = json.loads(json.dumps(attrs, default=_json_default))   # JSON-able private copy
    return {"attrs": attrs, "arrays": clean}, out_fmt


def _run_record(attrs, arrays, xs, in_fmts, out_fmt):
    """One integer op: int64 inputs -> codes of ``out_fmt.code_dtype``."""
    kind = attrs["kind"]
    x = xs[0] if xs else None
    if kind == "dense":
        if x.ndim != 2 or x.shape[1] != arrays["W"].shape[0]:
            raise ValueError(f"dense {attrs['name']!r} expects (N, {arrays['W'].shape[0]}) codes, got {x.shape}")
        acc = _matmul_int(x, arrays["W"].astype(np.int64)) + arrays["c"]
        return requantize(acc, attrs["acc_frac"], out_fmt)
    if kind == "conv2d":
        W = arrays["W"].astype(np.int64)
        if x.ndim != 4 or x.shape[1] != W.shape[1]:
            raise ValueError(f"conv2d {attrs['name']!r} expects (N, {W.shape[1]}, H, W) codes, got {x.shape}")
        acc = _conv(x, W, _pair(attrs["stride"]), _pair(attrs["padding"]), _matmul_int)
        return requantize(acc + arrays["c"].reshape(1, -1, 1, 1), attrs["acc_frac"], out_fmt)
    if kind == "scale":
        shp = _channel_shape(x.ndim)
        acc = x * arrays["W"].astype(np.int64).reshape(shp) + arrays["c"].reshape(shp)
        return requantize(acc, attrs["acc_frac"], out_fmt)
    if kind == "relu":
        return np.maximum(x, 0).astype(out_fmt.code_dtype)
    if kind == "leaky_relu":
        neg = round_shift(x * int(attrs["slope_code"]), int(attrs["slope_frac"]), out_fmt.rounding)
        return overflow(np.where(x > 0, x, neg), out_fmt).astype(out_fmt.code_dtype)
    if kind == "maxpool2d":
        return _windows(x, _pair(attrs["kernel_size"]), _pair(attrs["stride"])).max(axis=(-2, -1)).astype(out_fmt.code_dtype)
    if kind == "avgpool2d":
        s = _windows(x, _pair(attrs["kernel_size"]), _pair(attrs["stride"])).sum(axis=(-2, -1))
        r = round_shift(s * int(attrs["recip"]), int(attrs["recip_shift"]), out_fmt.rounding)
        return overflow(r, out_fmt).astype(out_fmt.code_dtype)
    if kind == "flatten":
        return x.reshape(x.shape[0], -1).astype(out_fmt.code_dtype)
    if kind == "add":
        a, b = xs
        if a.shape != b.shape:
            raise ValueError(f"add {attrs['name']!r}: operand shapes {a.shape} and {b.shape} differ")
        fa, fb = in_fmts[0].frac, in_fmts[1].frac
        f = max(fa, fb)        # exact alignment to the finer operand, then one rounding
        acc = round_shift(a, fa - f) + round_shift(b, fb - f)
        return requantize(acc, f, out_fmt)
    if kind == "lut":
        return arrays["table"][x - int(attrs["index_offset"])].astype(out_fmt.code_dtype)
    raise ValueError(f"unknown record kind {kind!r}")  # pragma: no cover - validated earlier


class IntegerModel:
    """Integer-only reference inference over a list of plain-data layer records.

    Each record is ``{"attrs": dict (JSON-able), "arrays": dict[str, ndarray]}``; ``attrs`` has
    ``kind`` (one of ``RECORD_KINDS``), ``name`` (path of the float layer(s) in the model,
    e.g. ``"1.0+1.1"`` for a Dense at block 1 with its BatchNorm folded in), ``block`` (top-level
    block index, -1 for the input), ``inputs`` (indices of earlier records), ``out_fmt``
    (``QFormat.to_dict()``) and the kind's own fields.  Record 0 is the input.

    Use :func:`compile_integer` to build one from a float model, :meth:`from_records` to rebuild
    one from an exported file.

    Record kinds (attrs beyond the common ones; arrays), see :func:`compile_integer` for the math:

    ==========  ==========================================  ====================================
    kind        attrs                                       arrays
    ==========  ==========================================  ====================================
    input       shape (per-sample list)                     -
    dense       w_fmt (QFormat dict), acc_frac              W (in, out) w codes, c (out,) int64
    conv2d      w_fmt, acc_frac, stride [sh, sw],           W (out, in, kh, kw), c (out,) int64
                padding [ph, pw]
    scale       w_fmt, acc_frac                             W (C,), c (C,) int64
    relu        -                                           -
    leaky_relu  slope (float, informational),               -
                slope_code, slope_frac
    maxpool2d   kernel_size [kh, kw], stride [sh, sw]       -
    avgpool2d   kernel_size, stride, recip, recip_shift     -
    flatten     -                                           -
    add         - (two inputs)                              -
    lut         function ("sigmoid" | "tanh"),              table (2**in_width,) out codes
                index_offset (= input min_code)
    ==========  ==========================================  ====================================

    dense / conv2d / scale records also carry ``W_float``, ``c_float`` (float64, BN folded):
    informational, not used by :meth:`run`.  ``c`` is the bias at ``acc_frac`` fractional bits.
    """

    def __init__(self, records):
        if not isinstance(records, (list, tuple)) or not records:
            raise ValueError("IntegerModel expects a non-empty list of records")
        self._records, self._fmts = [], []
        for i, rec in enumerate(records):
            clean, fmt = _validate_record(i, rec, self._fmts)
            self._records.append(clean)
            self._fmts.append(fmt)

    @classmethod
    def from_records(cls, records) -> "IntegerModel":
        """Rebuild from plain data (e.g. read back from HDF5); validates every record."""
        return cls(records)

    @property
    def records(self) -> list:
        """The layer records (plain data; treat as read-only)."""
        return self._records

    @property
    def formats(self) -> list:
        """Output QFormat of every record (same order as the trace)."""
        return list(self._fmts)

    @property
    def input_fmt(self) -> QFormat:
        return self._fmts[0]

    @property
    def output_fmt(self) -> QFormat:
        return self._fmts[-1]

    def quantize_input(self, x) -> np.ndarray:
        """Float input (N, *input_shape) -> input codes."""
        x = np.asarray(x)
        shape = tuple(self._records[0]["attrs"]["shape"])
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape or x.shape[0] == 0:
            raise ValueError(f"IntegerModel expects input of shape (N, {', '.join(map(str, shape))}), got {x.shape}")
        return quantize(x, self.input_fmt)

    def run(self, x_codes) -> list:
        """Integer inference.  Returns the trace: one code array per record (trace[0] is the
        input codes, trace[-1] the model output), each of its record's ``out_fmt.code_dtype``."""
        x = _as_int64(x_codes, "IntegerModel.run")
        shape = tuple(self._records[0]["attrs"]["shape"])
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape or x.shape[0] == 0:
            raise ValueError(f"IntegerModel.run expects codes of shape (N, {', '.join(map(str, shape))}), got {x.shape}")
        f0 = self.input_fmt
        if x.min() < f0.min_code or x.max() > f0.max_code:
            raise ValueError(f"IntegerModel.run: input codes outside {f0.hls_type}; use quantize_input")
        trace = [x.astype(f0.code_dtype)]
        for rec, fmt in zip(self._records[1:], self._fmts[1:]):
            ins = rec["attrs"]["inputs"]
            xs = [trace[j].astype(np.int64) for j in ins]
            trace.append(_run_record(rec["attrs"], rec["arrays"], xs, [self._fmts[j] for j in ins], fmt))
        return trace

    def infer(self, x) -> np.ndarray:
        """Float in, float64 out: dequantize(run(quantize_input(x))[-1])."""
        return dequantize(self.run(self.quantize_input(x))[-1], self.output_fmt)

    def __len__(self):
        return len(self._records)

    def __repr__(self):
        rows = [f"  {i:3d} {r['attrs']['kind']:<11s} {r['attrs']['name']:<14s} "
                f"{QFormat.from_dict(r['attrs']['out_fmt']).hls_type}" for i, r in enumerate(self._records)]
        return "IntegerModel(\n" + "\n".join(rows) + "\n)"


# ------------------------------------------------------------------------------------------------
# compiler: float model -> records
# ------------------------------------------------------------------------------------------------
def _hp(layer, key, default=None):
    hp = layer.hyperparameters() if hasattr(layer, "hyperparameters") else {}
    return hp[key] if key in hp else getattr(layer, key, default)


class _Compiler:
    """Walks the float model once, computing float64 activations of the (BN-folded) graph on the
    calibration batch to calibrate each record's output format."""

    def __init__(self, width, rounding, overflow, percentile):
        from . import layers as L
        self.L = L
        self.width, self.rounding, self.overflow, self.percentile = width, rounding, overflow, percentile
        self.records, self.acts, self.fmts = [], [], []

    def fmt(self, width, frac):
        return QFormat(width, frac, True, self.rounding, self.overflow)

    def emit(self, kind, name, inputs, y, attrs=None, arrays=None, out_fmt=None):
        if out_fmt is None:
            out_fmt = calibrate_activation(y, self.width, self.percentile,
                                           rounding=self.rounding, overflow=self.overflow)
        head = name.split(".")[0].split("+")[0]
        block = int(head) if head.isdigit() else -1
        a = {"kind": kind, "name": name, "block": block, "inputs": list(inputs),
             "out_fmt": out_fmt.to_dict(), **(attrs or {})}
        self.records.append({"attrs": a, "arrays": arrays or {}})
        self.acts.append(y)
        self.fmts.append(out_fmt)
        return len(self.records) - 1

    @staticmethod
    def items(layer, path):
        """Flatten nested Sequentials into [(path, layer)]."""
        from .layers import Sequential
        if isinstance(layer, Sequential):
            out = []
            for i, child in enumerate(layer.layers):
                out += _Compiler.items(child, f"{path}.{i}" if path else str(i))
            return out
        return [(path, layer)]

    def sequence(self, items, idx):
        L, i = self.L, 0
        while i < len(items):
            path, layer = items[i]
            nxt = items[i + 1] if i + 1 < len(items) else (None, None)
            if isinstance(layer, (L.Dense, L.Conv2d)) and isinstance(nxt[1], L.BatchNorm):
                idx = self.affine(f"{path}+{nxt[0]}", layer, nxt[1], idx)
                i += 2
            else:
                idx = self.layer(path, layer, idx)
                i += 1
        return idx

    def layer(self, name, layer, idx):
        L = self.L
        x, in_fmt = self.acts[idx], self.fmts[idx]
        if isinstance(layer, (L.Dense, L.Conv2d)):
            return self.affine(name, layer, None, idx)
        if isinstance(layer, L.BatchNorm):
            return self.scale(name, layer, idx)
        if isinstance(layer, L.Residual):
            body = self.sequence(self.items(layer.body, f"{name}.body"), idx)
            sc = idx if layer.shortcut is None else self.sequence(self.items(layer.shortcut, f"{name}.shortcut"), idx)
            if self.acts[body].shape != self.acts[sc].shape:
                raise ValueError(f"Residual {name}: body {self.acts[body].shape} and shortcut "
                                 f"{self.acts[sc].shape} outputs differ")
            return self.emit("add", name, [body, sc], self.acts[body] + self.acts[sc])
        if isinstance(layer, L.ReLU):
            return self.emit("relu", name, [idx], np.maximum(x, 0.0), out_fmt=in_fmt)
        if isinstance(layer, L.LeakyReLU):
            slope = float(layer.slope)
            sf = calibrate_weight(np.array([slope]), 16, rounding=self.rounding)
            code = int(quantize(slope, sf))
            return self.emit("leaky_relu", name, [idx], np.where(x > 0, x, slope * x),
                             {"slope": slope, "slope_code": code, "slope_frac": sf.frac}, out_fmt=in_fmt)
        if isinstance(layer, (L.Sigmoid, L.Tanh)):
            return self.lut(name, layer, idx)
        if isinstance(layer, L.Flatten):
            return self.emit("flatten", name, [idx], x.reshape(x.shape[0], -1), out_fmt=in_fmt)
        if isinstance(layer, (L.MaxPool2d, L.AvgPool2d)):
            k = _pair(_hp(layer, "kernel_size"))
            s = _hp(layer, "stride")
            s = k if s is None else _pair(s)
            if _pair(_hp(layer, "padding", 0) or 0) != (0, 0):
                raise ValueError(f"{name}: padded pooling has no integer implementation")
            win = _windows(x, k, s)
            attrs = {"kernel_size": list(k), "stride": list(s)}
            if isinstance(layer, L.MaxPool2d):
                return self.emit("maxpool2d", name, [idx], win.max(axis=(-2, -1)), attrs, out_fmt=in_fmt)
            recip, rshift = _avg_reciprocal(k[0] * k[1])
            attrs.update(recip=recip, recip_shift=rshift)
            return self.emit("avgpool2d", name, [idx], win.mean(axis=(-2, -1)), attrs, out_fmt=in_fmt)
        raise ValueError(f"compile_integer: layer {name} ({type(layer).__name__}) has no integer "
                         "implementation; supported: Dense, Conv2d, BatchNorm, ReLU, LeakyReLU, "
                         "Sigmoid, Tanh, Flatten, MaxPool2d, AvgPool2d, Residual, Sequential")

    def affine(self, name, layer, bn, idx):
        L = self.L
        x, in_fmt = self.acts[idx], self.fmts[idx]
        W = np.asarray(layer.params["W"], dtype=np.float64)
        c = layer.params.get("c")
        c = np.zeros(W.shape[1] if W.ndim == 2 else W.shape[0]) if c is None else np.asarray(c, np.float64)
        if bn is not None:
            W, c = fold_batchnorm(W, c, bn.params.get("gamma", np.ones_like(c)), bn.params.get("beta", np.zeros_like(c)),
                                  bn.buffers["running_mean"], bn.buffers["running_var"], bn.eps)
        w_fmt = calibrate_weight(W, self.width, rounding=self.rounding, overflow=self.overflow)
        acc_frac = in_fmt.frac + w_fmt.frac
        Wq = quantize(W, w_fmt)
        cq = _quantize_int64(c, acc_frac, self.rounding, f"compile_integer {name} bias")
        if isinstance(layer, L.Dense):
            kind, attrs, y = "dense", {}, x @ W + c
            k = W.shape[0]
        else:
            stride = _pair(_hp(layer, "stride", 1))
            padding = _pair(_hp(layer, "padding", 0))
            kind, attrs = "conv2d", {"stride": list(stride), "padding": list(padding)}
            y = _conv(x, W, stride, padding, np.matmul) + c.reshape(1, -1, 1, 1)
            k = int(np.prod(W.shape[1:]))
        bound = k * (1 << (in_fmt.width - 1)) * (1 << (w_fmt.width - 1)) + int(np.abs(cq).max(initial=0))
        if bound >= 2 ** 62:
            raise ValueError(f"compile_integer {name}: accumulator could reach {bound} and overflow "
                             "int64; use a smaller width")
        attrs.update(w_fmt=w_fmt.to_dict(), acc_frac=acc_frac)
        arrays = {"W": Wq, "c": cq, "W_float": W, "c_float": c}
        return self.emit(kind, name, [idx], y, attrs, arrays)

    def scale(self, name, bn, idx):
        x, in_fmt = self.acts[idx], self.fmts[idx]
        n = bn.buffers["running_mean"].shape[0]
        s, t = fold_batchnorm(np.eye(n), None, bn.params.get("gamma", np.ones(n)), bn.params.get("beta", np.zeros(n)),
                              bn.buffers["running_mean"], bn.buffers["running_var"], bn.eps)
        s = np.diag(s).copy()
        w_fmt = calibrate_weight(s, self.width, rounding=self.rounding, overflow=self.overflow)
        acc_frac = in_fmt.frac + w_fmt.frac
        shp = _channel_shape(x.ndim)
        arrays = {"W": quantize(s, w_fmt), "c": _quantize_int64(t, acc_frac, self.rounding, f"{name} shift"),
                  "W_float": s, "c_float": t}
        return self.emit("scale", name, [idx], x * s.reshape(shp) + t.reshape(shp),
                         {"w_fmt": w_fmt.to_dict(), "acc_frac": acc_frac}, arrays)

    def lut(self, name, layer, idx):
        x, in_fmt = self.acts[idx], self.fmts[idx]
        if in_fmt.width > 16:
            raise ValueError(f"{name}: lookup tables need an input width <= 16, got {in_fmt.width}")
        from .layers import sigmoid
        f = np.tanh if isinstance(layer, self.L.Tanh) else sigmoid
        out_fmt = self.fmt(self.width, self.width - 1)
        table_fmt = QFormat(out_fmt.width, out_fmt.frac, True, self.rounding, "saturate")
        grid = dequantize(np.arange(in_fmt.min_code, in_fmt.max_code + 1), in_fmt)
        table = quantize(f(grid), table_fmt)
        return self.emit("lut", name, [idx], f(x), {"function": "tanh" if f is np.tanh else "sigmoid",
                         "index_offset": in_fmt.min_code}, {"table": table}, out_fmt=out_fmt)


def compile_integer(model, calibration_x, *, width=8, rounding="nearest", overflow="saturate",
                    percentile=100.0, input_fmt=None, check=True) -> IntegerModel:
    """Compile a float model into integer-only reference inference.

    Walks ``model`` (a ``Sequential`` of blocks; nested Sequentials are flattened, a ``Residual``
    becomes its body and shortcut paths plus an ``add`` record), folds each BatchNorm into the
    Dense / Conv2d right before it (a BatchNorm elsewhere becomes a per-channel ``scale``),
    quantises weights per tensor (:func:`calibrate_weight`) and each record's output from the
    float64 activations of ``calibration_x`` (:func:`calibrate_activation` with ``percentile``).

    Integer semantics per record kind (x, y codes; all arithmetic int64):

    - dense / conv2d / scale: acc = x @ W_q (im2col for conv, per channel for scale) + c_q, where
      c_q is the bias at acc_frac = in_frac + w_frac; y = requantize(acc, acc_frac, out_fmt).
    - relu: y = max(x, 0).  leaky_relu: y = x if x > 0 else round_shift(x * slope_code,
      slope_frac) (slope as a 16-bit code), then overflow.  Both keep the input format.
    - maxpool2d: max of codes.  avgpool2d: y = round_shift(sum * recip, 30) with
      recip = round(2**30 / k) (k = window size): exact ``sum >> log2 k`` for power-of-two
      windows, else a fixed-point reciprocal (error < 1 code step for windows < 2**14).
      Both keep the input format.
    - flatten: reshape.  add (Residual): both operands are aligned exactly to the larger frac by
      left shifts, added in int64, then requantised once to the calibrated out_fmt.
    - lut (Sigmoid / Tanh): y = table[x - min_code], a table of 2**in_width entries (in_width
      <= 16) with output format frac = width - 1 (signed; entries saturated).

    Parameters
    ----------
    model : Layer (usually Sequential of blocks), float weights, eval-mode BN statistics used
    calibration_x : (N, *input_shape) float array
    width : int, 2..16, bits of weights and activations
    rounding, overflow : QFormat modes used everywhere
    percentile : float in (0, 100], activation calibration (100 = no clipping)
    input_fmt : QFormat or None (None: calibrated from calibration_x)
    check : bool, compare the compiler's float64 twin with ``model.forward(x, train=False)``
        (catches a layer convention the compiler misreads)

    Returns
    -------
    IntegerModel
    """
    if not 2 <= int(width) <= 16:
        raise ValueError(f"compile_integer: width must be in 2..16 (int64 accumulators), got {width}")
    x = _finite_array(calibration_x, "compile_integer calibration_x")
    if x.ndim < 2:
        raise ValueError(f"compile_integer expects a calibration batch (N, ...), got shape {x.shape}")
    comp = _Compiler(int(width), rounding, overflow, percentile)
    QFormat(int(width), 0, True, rounding, overflow)   # validates the modes early
    if input_fmt is None:
        input_fmt = calibrate_activation(x, width, percentile, rounding=rounding, overflow=overflow)
    _check_fmt(input_fmt, "compile_integer input_fmt")
    comp.emit("input", "input", [], x, {"shape": list(x.shape[1:])}, out_fmt=input_fmt)
    root = comp.items(model, "") if isinstance(model, comp.L.Sequential) else [("0", model)]
    comp.sequence(root, 0)
    if check:
        ref = np.asarray(model.forward(np.asarray(calibration_x), train=False), dtype=np.float64)
        twin = comp.acts[-1]
        scale = max(float(np.abs(ref).max()), 1e-12)
        if ref.shape != twin.shape or float(np.abs(ref - twin).max()) > 1e-3 * scale:
            raise RuntimeError("compile_integer: the compiler's float twin disagrees with "
                               "model.forward(x, train=False); a layer convention is not understood")
    return IntegerModel(comp.records)
