"""Q formats: fixed-point number formats, float <-> code conversion, integer rescaling.

A value x is stored as an integer *code* q with x ~= q * 2**-frac.  A :class:`QFormat` is the
hls4ml / Vivado-HLS type ``ap_fixed<W, I, Q, O>`` (``ap_ufixed`` when unsigned) with::

    W = width,  I = width - frac (integer bits incl. sign),
    rounding  "floor" = AP_TRN (toward -inf), "nearest" = AP_RND (half toward +inf),
              "nearest_even" = AP_RND_CONV (half to even),
    overflow  "saturate" = AP_SAT, "wrap" = AP_WRAP (two's complement, keep the low W bits).

Everything after :func:`quantize` is integer arithmetic on int64 (what a firmware engineer
writes in C): products accumulate in int64, :func:`round_shift` rescales with the chosen
rounding, :func:`overflow` saturates or wraps to the width.  No layer knowledge here: the layer
records that use these functions are in :mod:`bll_ref.fixedpoint.records`; choosing a format
for a tensor is in :mod:`bll_ref.fixedpoint.calibrate`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["QFormat", "quantize", "dequantize", "round_shift", "div_round", "overflow", "requantize",
           "round_float", "ROUNDING_MODES", "OVERFLOW_MODES", "CALIBRATIONS"]

ROUNDING_MODES = ("floor", "nearest", "nearest_even")
OVERFLOW_MODES = ("saturate", "wrap")
CALIBRATIONS = ("percentile", "mse")    # activation calibration methods (compile_integer)
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
    def max_abs_code(self) -> int:
        """The largest magnitude of a code of the format (the bound of every product and sum over its codes)."""
        return max(-self.min_code, self.max_code)

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
def round_float(v, rounding):
    """Round float64 integers-to-be exactly.  v - floor(v) is exact for ``|v| >= 1`` and for
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
    r = round_float(v, fmt.rounding)
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

    The rounding modes::

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


def div_round(acc, k: int, rounding: str = "floor") -> np.ndarray:
    """Exact ``acc / k`` rounded, for int64 ``acc`` and an integer ``k >= 1`` (average pooling).

    With the floor division ``q = floor(acc / k)`` and the remainder ``r = acc - q*k`` in ``[0, k)``:
    floor: ``q``; nearest: ``q + (2*r >= k)``; nearest_even: ``q + (2*r > k or (2*r == k and q odd))``.
    Those are round_shift's rules with ``k`` in place of ``2**shift``, so for ``k = 2**s`` it equals
    ``round_shift(acc, s, rounding)``.  No reciprocal: a multiply-shift cannot be exact for
    signed sums under floor (docs/hdf5-format.md, section 6, avgpool2d).  Returns int64.
    """
    acc = _as_int64(acc, "div_round")
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"div_round: the divisor must be a positive integer, got {k}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"div_round: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    q, r = np.divmod(acc, np.int64(k))       # numpy's int divmod is floor division: 0 <= r < k
    if rounding == "floor":
        return q
    if rounding == "nearest":
        return q + (2 * r >= k)
    return q + ((2 * r > k) | ((2 * r == k) & (np.bitwise_and(q, 1) == 1)))


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
    r = round_float(v, rounding)
    if np.any(np.abs(r) >= 2.0 ** 62):
        raise ValueError(f"{who}: values up to {np.abs(x).max():g} at {frac} fractional bits do "
                         "not fit an int64 accumulator; the layer's input or weight range is degenerate")
    return r.astype(np.int64)
