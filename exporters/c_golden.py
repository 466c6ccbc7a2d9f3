"""The C99 golden model of an :class:`~bll_ref.fixedpoint.IntegerModel`: one static function per
record (chosen by the record's type), the runtime helpers (C twins of ``round_shift``,
``overflow``, ``requantize``) and ``<name>_run``.  :mod:`exporters.c_header` writes it with the
header and the test program; the file layout is described there.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from bll_ref.fixedpoint import IntegerModel
from bll_ref.fixedpoint import records as R

__all__ = []  # the per-record C code generators of c_header.py (one package: exporters)


# ------------------------------------------------------------------------------------------------
# C text helpers
# ------------------------------------------------------------------------------------------------
def _lit(v: int, ctype: str) -> str:
    """An integer literal of ``ctype`` that is valid C99 for every value of the type."""
    if ctype == "int64_t":
        return "(-INT64_C(9223372036854775807) - 1)" if v == -(1 << 63) else f"INT64_C({v})"
    if ctype == "int32_t" and v == -(1 << 31):
        return "(-2147483647 - 1)"
    if ctype.startswith("uint"):
        return f"{v}u"
    return str(v)


def _values(a, ctype, indent="    ", per_line=16) -> str:
    flat = [_lit(v, ctype) for v in np.asarray(a).ravel().tolist()]
    rows = [", ".join(flat[i:i + per_line]) for i in range(0, len(flat), per_line)]
    return (",\n").join(indent + r for r in rows)


def _array(ctype, cname, a) -> str:
    a = np.asarray(a)
    return f"static const {ctype} {cname}[{a.size}] = {{\n{_values(a, ctype)}\n}};\n"


def _comment(s) -> str:
    """``s`` (e.g. a record name from a file) made safe inside a ``/* */`` comment: printable ASCII
    only (anything else as a \\xNN / \\uNNNN escape, so no newline or line splice), no comment
    delimiter and no trigraph (``??=`` and friends, which -Wall -Werror rejects)."""
    s = str(s).encode("ascii", "backslashreplace").decode("ascii")
    s = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in s)
    return re.sub(r"\?(?=\?)", "? ", s.replace("*/", "* /").replace("/*", "/ *"))


def _cstring(s) -> str:
    """``s`` as a C string literal: its UTF-8 bytes, printable ASCII as itself, the rest as octal
    escapes; backslash, quote and ``?`` escaped (``\\?``: no trigraph)."""
    out = []
    for b in str(s).encode("utf-8", "backslashreplace"):
        c = chr(b)
        out.append("\\" + c if c in '\\"?' else c if 0x20 <= b < 0x7F else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _shape(s) -> str:
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


# ------------------------------------------------------------------------------------------------
# the runtime helpers (C twins of fixedpoint.round_shift / overflow / requantize)
# ------------------------------------------------------------------------------------------------
_C_FROM_U64 = """
/* The int64 whose two's complement bits are u (avoids the implementation-defined conversion). */
static int64_t bll_from_u64(uint64_t u)
{
    return u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}
"""

_C_ROUND_SHIFT = """
/* floor(a / 2**s) for 0 < s < 64 (C99's >> on negative values is implementation-defined). */
static int64_t bll_floor_shift(int64_t a, int s)
{
    if (a >= 0)
        return (int64_t)((uint64_t)a >> s);
    return -(int64_t)((uint64_t)(-(a + 1)) >> s) - 1;
}

/* fixedpoint.round_shift: a / 2**shift rounded (floor | nearest = half up | nearest_even);
   a negative shift is an exact left shift. */
static int64_t bll_round_shift(int64_t a, int shift, int rounding)
{
    int64_t q, r, half;
    if (shift == 0)
        return a;
    if (shift < 0)
        return -shift >= 64 ? 0 : bll_from_u64((uint64_t)a << -shift);
    if (shift >= 64)
        return (rounding == BLL_FLOOR && a < 0) ? -1 : 0;
    q = bll_floor_shift(a, shift);
    if (rounding == BLL_FLOOR)
        return q;
    r = (int64_t)((uint64_t)a & (((uint64_t)1 << shift) - 1u));
    half = (int64_t)((uint64_t)1 << (shift - 1));
    if (rounding == BLL_NEAREST)
        return q + (r >= half);
    return q + (r > half || (r == half && ((uint64_t)q & 1u)));
}
"""

_C_OVERFLOW = """
/* fixedpoint.overflow: saturate to [min, max] or keep the low width bits (two's complement). */
static int64_t bll_overflow(int64_t c, int width, int is_signed, int mode)
{
    int64_t lo = is_signed ? -((int64_t)1 << (width - 1)) : 0;
    int64_t hi = is_signed ? ((int64_t)1 << (width - 1)) - 1 : ((int64_t)1 << width) - 1;
    int64_t m;
    if (mode == BLL_SATURATE)
        return c < lo ? lo : (c > hi ? hi : c);
    m = (int64_t)((uint64_t)c & (((uint64_t)1 << width) - 1u));
    return m > hi ? m - ((int64_t)1 << width) : m;
}
"""

_C_DIV_ROUND = """
/* fixedpoint.div_round: s / k for k > 0, exact and rounded like bll_round_shift (average pooling).
   C99's / and % truncate toward zero, so the remainder is first moved into [0, k). */
static int64_t bll_div_round(int64_t s, int64_t k, int rounding)
{
    int64_t q = s / k, r = s % k;
    if (r < 0) {
        q -= 1;
        r += k;
    }
    if (rounding == BLL_FLOOR)
        return q;
    if (rounding == BLL_NEAREST)
        return q + (2 * r >= k);
    return q + (2 * r > k || (2 * r == k && ((uint64_t)q & 1u)));
}
"""

_C_REQUANTIZE = """
/* fixedpoint.requantize: accumulator with acc_frac fractional bits -> codes with frac bits;
   shift = acc_frac - frac.  Left shifts (shift < 0) are overflow-safe as in the reference. */
static int32_t bll_requantize(int64_t acc, int shift, int width, int is_signed, int rounding, int mode)
{
    int64_t r;
    if (shift >= 0) {
        r = bll_round_shift(acc, shift, rounding);
    } else if (mode == BLL_SATURATE) {
        int s = -shift < 40 ? -shift : 40;       /* 2**40 > any max code: larger shifts saturate alike */
        int64_t lim = (int64_t)1 << (62 - s);
        acc = acc < -lim ? -lim : (acc > lim ? lim : acc);
        r = bll_from_u64((uint64_t)acc << s);
    } else if (-shift >= width) {
        r = 0;                                    /* only the low width bits survive a wrap */
    } else {
        r = (int64_t)(((uint64_t)acc & (((uint64_t)1 << width) - 1u)) << -shift);
    }
    return (int32_t)bll_overflow(r, width, is_signed, mode);
}
"""


# ------------------------------------------------------------------------------------------------
# per-record code
# ------------------------------------------------------------------------------------------------
class _Gen:
    """Names and sizes of one generated model: prefix, per-record shapes, trace offsets."""

    def __init__(self, im: IntegerModel, name: str, shapes):
        self.im, self.p, self.P = im, name, name.upper()
        self.shapes = shapes
        self.sizes = [int(np.prod(s)) for s in shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()

    def m(self, i, field):
        return f"{self.P}_R{i}_{field}"

    def fmt_args(self, i):
        """width, signed, rounding, overflow macros of record i's output format."""
        return ", ".join(self.m(i, f) for f in ("WIDTH", "SIGNED", "ROUNDING", "OVERFLOW"))

    def wname(self, i, key):
        return f"{self.p}_r{i}_{key}"

    def req(self, i, ch="o"):
        """bll_requantize's arguments after acc for record i; per-channel weight formats add
        channel ``ch``'s frac offset to the accumulator's fractional bits."""
        rec = self.im.records[i]
        extra = f" + {self.wname(i, 'wfrac')}[{ch}]" if getattr(rec, "w_frac", None) is not None else ""
        return f"{self.m(i, 'ACC_FRAC')}{extra} - {self.m(i, 'FRAC')}, {self.fmt_args(i)}"

    def function(self, i):
        rec = self.im.records[i]
        head = f"/* record {i}: {rec.kind} {_comment(rec.name)} */\n"
        sig = (f"static void {self.p}_r{i}(const int32_t *a, const int32_t *b, int32_t *y)" if isinstance(rec, R.Add)
               else f"static void {self.p}_r{i}(const int32_t *x, int32_t *y)")
        body = _body(rec, self, i, [self.shapes[j] for j in rec.inputs], self.shapes[i])
        return f"{head}{sig}\n{{\n{body}}}\n"


@functools.singledispatch
def _body(rec, g, i, ins, out):
    """The C body of record ``i`` (input shapes ``ins``, output shape ``out``), by record type."""
    raise ValueError(f"write_c: record {i} ({type(rec).__name__}) has no C implementation")


@_body.register(R.Dense)
def _dense(rec, g, i, ins, out):
    (k,), (n,) = ins[0], out
    return (f"    long o, j;\n"
            f"    for (o = 0; o < {n}; ++o) {{\n"
            f"        int64_t acc = {g.wname(i, 'c')}[o];\n"
            f"        for (j = 0; j < {k}; ++j)\n"
            f"            acc += (int64_t)x[j] * {g.wname(i, 'W')}[j * {n} + o];\n"
            f"        y[o] = bll_requantize(acc, {g.req(i)});\n"
            f"    }}\n")


@_body.register(R.Conv2d)
def _conv2d(rec, g, i, ins, out):
    ci, h, w = ins[0]
    co, ho, wo = out
    kh, kw = rec.W.shape[2:]
    (sh, sw), (ph, pw) = rec.stride, rec.padding
    return (f"    long o, oh, ow, c, u, v;\n"
            f"    for (o = 0; o < {co}; ++o)\n"
            f"        for (oh = 0; oh < {ho}; ++oh)\n"
            f"            for (ow = 0; ow < {wo}; ++ow) {{\n"
            f"                int64_t acc = {g.wname(i, 'c')}[o];\n"
            f"                for (c = 0; c < {ci}; ++c)\n"
            f"                    for (u = 0; u < {kh}; ++u) {{\n"
            f"                        long ih = oh * {sh} + u - {ph};\n"
            f"                        if (ih < 0 || ih >= {h})\n"
            f"                            continue;          /* zero padding */\n"
            f"                        for (v = 0; v < {kw}; ++v) {{\n"
            f"                            long iw = ow * {sw} + v - {pw};\n"
            f"                            if (iw < 0 || iw >= {w})\n"
            f"                                continue;\n"
            f"                            acc += (int64_t)x[(c * {h} + ih) * {w} + iw]\n"
            f"                                   * {g.wname(i, 'W')}"
            f"[((o * {ci} + c) * {kh} + u) * {kw} + v];\n"
            f"                        }}\n"
            f"                    }}\n"
            f"                y[(o * {ho} + oh) * {wo} + ow] = bll_requantize(acc, {g.req(i)});\n"
            f"            }}\n")


@_body.register(R.Scale)
def _scale(rec, g, i, ins, out):
    ch = ins[0][0]
    inner = int(np.prod(ins[0][1:]))
    return (f"    long c, k;\n"
            f"    for (c = 0; c < {ch}; ++c)\n"
            f"        for (k = 0; k < {inner}; ++k) {{\n"
            f"            int64_t acc = (int64_t)x[c * {inner} + k] * {g.wname(i, 'W')}[c]\n"
            f"                          + {g.wname(i, 'c')}[c];\n"
            f"            y[c * {inner} + k] = bll_requantize(acc, {g.req(i, 'c')});\n"
            f"        }}\n")


def _each(g, i, stmt):
    """One C statement for every element k of record i's output."""
    return f"    long k;\n    for (k = 0; k < {g.sizes[i]}; ++k)\n        {stmt}\n"


@_body.register(R.ReLU)
def _relu(rec, g, i, ins, out):
    return _each(g, i, "y[k] = x[k] > 0 ? x[k] : 0;")


@_body.register(R.LeakyReLU)
def _leaky_relu(rec, g, i, ins, out):
    return (f"    long k;\n"
            f"    for (k = 0; k < {g.sizes[i]}; ++k) {{\n"
            f"        int64_t v = x[k] > 0 ? (int64_t)x[k]\n"
            f"                  : bll_round_shift((int64_t)x[k] * {g.m(i, 'SLOPE_CODE')}, "
            f"{g.m(i, 'SLOPE_FRAC')}, {g.m(i, 'ROUNDING')});\n"
            f"        y[k] = (int32_t)bll_overflow(v, {g.m(i, 'WIDTH')}, {g.m(i, 'SIGNED')}, "
            f"{g.m(i, 'OVERFLOW')});\n"
            f"    }}\n")


def _pool(rec, g, i, ins, out, init, step, finish):
    c, h, w = ins[0]
    _, ho, wo = out
    (kh, kw), (sh, sw) = rec.kernel_size, rec.stride
    return (f"    long c, oh, ow, u, v;\n"
            f"    for (c = 0; c < {c}; ++c)\n"
            f"        for (oh = 0; oh < {ho}; ++oh)\n"
            f"            for (ow = 0; ow < {wo}; ++ow) {{\n"
            f"                const int32_t *win = x + (c * {h} + oh * {sh}) * {w} + ow * {sw};\n"
            f"                {init}\n"
            f"                for (u = 0; u < {kh}; ++u)\n"
            f"                    for (v = 0; v < {kw}; ++v)\n"
            f"                        {step}\n"
            f"                y[(c * {ho} + oh) * {wo} + ow] = {finish};\n"
            f"            }}\n")


@_body.register(R.MaxPool2d)
def _maxpool2d(rec, g, i, ins, out):
    return _pool(rec, g, i, ins, out, "int32_t m = win[0];",
                 f"if (win[u * {ins[0][2]} + v] > m) m = win[u * {ins[0][2]} + v];", "m")


@_body.register(R.AvgPool2d)
def _avgpool2d(rec, g, i, ins, out):
    k = rec.kernel_size[0] * rec.kernel_size[1]
    return _pool(rec, g, i, ins, out, "int64_t s = 0;", f"s += win[u * {ins[0][2]} + v];",
                 f"(int32_t)bll_overflow(\n"
                 f"                    bll_div_round(s, {k}, {g.m(i, 'ROUNDING')}),\n"
                 f"                    {g.m(i, 'WIDTH')}, {g.m(i, 'SIGNED')}, "
                 f"{g.m(i, 'OVERFLOW')})")


@_body.register(R.Flatten)
def _flatten(rec, g, i, ins, out):
    return _each(g, i, "y[k] = x[k];")


@_body.register(R.Add)
def _add(rec, g, i, ins, out):
    ja, jb = rec.inputs
    fa, fb = g.im.formats[ja].frac, g.im.formats[jb].frac
    f = max(fa, fb)       # both operands aligned exactly to the finer one, then one rounding
    return (f"    long k;\n"
            f"    for (k = 0; k < {g.sizes[i]}; ++k) {{\n"
            f"        int64_t acc = bll_round_shift(a[k], {fa - f}, BLL_FLOOR)"
            f" + bll_round_shift(b[k], {fb - f}, BLL_FLOOR);\n"
            f"        y[k] = bll_requantize(acc, {f} - {g.m(i, 'FRAC')}, {g.fmt_args(i)});\n"
            f"    }}\n")


@_body.register(R.Lut)
def _lut(rec, g, i, ins, out):
    return _each(g, i, f"y[k] = {g.wname(i, 'table')}[(long)x[k] - ({rec.index_offset})];")


# ------------------------------------------------------------------------------------------------
# <name>.c
# ------------------------------------------------------------------------------------------------
def _source(g: _Gen) -> str:
    P, p, im = g.P, g.p, g.im
    need_req = any(isinstance(r, (R.Affine, R.Add)) for r in im.records)
    need_rs = need_req or any(isinstance(r, R.LeakyReLU) for r in im.records)
    need_div = any(isinstance(r, R.AvgPool2d) for r in im.records)
    out = [f"/* {p}.c: integer-only reference inference (C99), generated by bll_ref exporters.c_header.\n"
           f"   Bit-exact twin of bll_ref.fixedpoint.IntegerModel.run; see {p}.h. */\n"
           f"#define {P}_IMPLEMENTATION\n#include \"{p}.h\"\n"]
    if need_rs:
        out += [_C_FROM_U64, _C_ROUND_SHIFT]
    if need_rs or need_div:
        out.append(_C_OVERFLOW)
    if need_div:
        out.append(_C_DIV_ROUND)
    if need_req:
        out.append(_C_REQUANTIZE)
    out += ["\n" + g.function(i) for i in range(1, len(im.records))]
    calls = []
    for i in range(1, len(im.records)):
        args = ", ".join(f"trace + {P}_R{j}_OFFSET" for j in im.records[i].inputs)
        calls.append(f"    {p}_r{i}({args}, trace + {P}_R{i}_OFFSET);")
    out.append(f"""
int {p}_run(const int32_t *input, int32_t *trace)
{{
    long k;
    for (k = 0; k < {P}_INPUT_SIZE; ++k)
        if (input[k] < {P}_INPUT_MIN || input[k] > {P}_INPUT_MAX)
            return -1;
    for (k = 0; k < {P}_INPUT_SIZE; ++k)
        trace[k] = input[k];
{chr(10).join(calls)}
    return 0;
}}
""")
    return "".join(out)
