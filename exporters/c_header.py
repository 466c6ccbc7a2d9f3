"""C export of an :class:`~bll_ref.fixedpoint.IntegerModel`: a header with the integer weights,
formats and test vectors, a portable C99 integer inference, and a test program.

``write_c(model, out_dir, name="bll_model", test_inputs=codes)`` writes three files:

``<name>.h``
    API (``<name>_run``), sizes, every record's Q-format as ``#define``\\ s (with its hls4ml
    ``ap_fixed`` spelling in a comment), offsets into the trace buffer, record names / kinds;
    the integer weights as ``static const int8_t/int16_t/int32_t/int64_t`` arrays (compiled in
    where ``<NAME>_IMPLEMENTATION`` is defined, i.e. in ``<name>.c``); the test vectors (input
    codes and the expected codes of EVERY record) where ``<NAME>_TEST_VECTORS`` is defined.
``<name>.c``
    ``int <name>_run(const int32_t *input, int32_t *trace)``: integer-only inference, one static
    function per record, int64 accumulators, the rounding / overflow / saturation of
    ``bll_ref.fixedpoint`` (``round_shift``, ``overflow``, ``requantize``) reproduced bit for bit.
    ``trace`` (``<NAME>_TRACE_SIZE`` codes) receives every record's output at
    ``<NAME>_R<i>_OFFSET``, record 0 being the input: the C twin of ``IntegerModel.run``.
    Returns 0, or -1 (trace untouched) if an input code lies outside the input format.
``<name>_test.c``
    ``main()``: runs the test vectors, compares every record with the expected codes, prints the
    mismatch count per record, exits 0 iff all match.  ``--dump`` also prints the traces,
    ``--run FILE`` runs the codes in FILE (count, then codes, whitespace separated) and prints
    their traces, one line ``T <sample> <record> <codes...>`` per record.

The C is C99 with no dependency beyond ``<stdint.h>`` (and ``<stdio.h>`` in the test program); it
compiles cleanly with ``cc -std=c99 -Wall -Wextra -Werror -O2``.  Signed right shifts and left
shifts of negative numbers (implementation-defined / undefined in C99) are done on ``uint64_t``
with explicit floor-division and two's-complement helpers.  Activations are ``int32_t`` in one
buffer per sample (a reference, not a memory-optimised kernel).  Where the Python reference
raises (an exact left shift leaving int64), the C result is unspecified.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile

import numpy as np

from bll_ref.fixedpoint import IntegerModel, QFormat

__all__ = ["write_c", "compile_c", "find_c_compiler", "CFLAGS"]

CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-O2")
_CTYPE = {"int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
          "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t"}
_ROUND = {"floor": "BLL_FLOOR", "nearest": "BLL_NEAREST", "nearest_even": "BLL_NEAREST_EVEN"}
_OVER = {"saturate": "BLL_SATURATE", "wrap": "BLL_WRAP"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
    return str(s).replace("*/", "* /")


def _cstring(s) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


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

    # -- header pieces ----------------------------------------------------------------------------
    def defines(self, i):
        a = self.im.records[i]["attrs"]
        f = self.im.formats[i]
        src = ", ".join(map(str, a["inputs"])) or "-"
        lines = [f"/* record {i}: {a['kind']} {_comment(a['name'])!s} <- record(s) {src}; output "
                 f"{_shape(self.shapes[i])} {f.hls_type} */",
                 f"#define {self.m(i, 'OFFSET')} {self.offsets[i]}",
                 f"#define {self.m(i, 'SIZE')} {self.sizes[i]}",
                 f"#define {self.m(i, 'WIDTH')} {f.width}",
                 f"#define {self.m(i, 'FRAC')} {f.frac}",
                 f"#define {self.m(i, 'SIGNED')} {int(f.signed)}",
                 f"#define {self.m(i, 'ROUNDING')} {_ROUND[f.rounding]}",
                 f"#define {self.m(i, 'OVERFLOW')} {_OVER[f.overflow]}"]
        if "w_fmt" in a:
            w = QFormat.from_dict(a["w_fmt"])
            lines += [f"#define {self.m(i, 'W_WIDTH')} {w.width}   /* weights {w.hls_type} */",
                      f"#define {self.m(i, 'W_FRAC')} {w.frac}",
                      f"#define {self.m(i, 'ACC_FRAC')} {int(a['acc_frac'])}"]
        if a["kind"] == "leaky_relu":
            lines += [f"#define {self.m(i, 'SLOPE_CODE')} {int(a['slope_code'])}   /* slope "
                      f"{float(a.get('slope', float('nan'))):g} */",
                      f"#define {self.m(i, 'SLOPE_FRAC')} {int(a['slope_frac'])}"]
        return "\n".join(lines) + "\n"

    def weights(self, i):
        a, arrs = self.im.records[i]["attrs"], self.im.records[i]["arrays"]
        out = []
        if a["kind"] in ("dense", "conv2d", "scale"):
            W = arrs["W"]
            layout = {"dense": "(in, out): y[o] = sum_i x[i] W[i][o] + c[o]",
                      "conv2d": "(out, in, kh, kw)", "scale": "(C,): one per channel"}[a["kind"]]
            out.append(f"/* record {i} weights {_shape(W.shape)} {layout}; bias at ACC_FRAC */\n")
            out.append(_array(_CTYPE[W.dtype.name], self.wname(i, "W"), W))
            out.append(_array("int64_t", self.wname(i, "c"), np.asarray(arrs["c"], np.int64)))
        elif a["kind"] == "lut":
            t = arrs["table"]
            out.append(f"/* record {i} {a.get('function', 'lut')} table: y = table[x - "
                       f"({int(a['index_offset'])})] */\n")
            out.append(_array(_CTYPE[self.im.formats[i].code_dtype.name], self.wname(i, "table"), t))
        return "".join(out)

    # -- source pieces ----------------------------------------------------------------------------
    def function(self, i):
        a = self.im.records[i]["attrs"]
        kind, ins = a["kind"], a["inputs"]
        head = f"/* record {i}: {kind} {_comment(a['name'])} */\n"
        sig = (f"static void {self.p}_r{i}(const int32_t *x, int32_t *y)" if kind != "add" else
               f"static void {self.p}_r{i}(const int32_t *a, const int32_t *b, int32_t *y)")
        body = getattr(self, "_" + kind)(i, a, [self.shapes[j] for j in ins], self.shapes[i])
        return f"{head}{sig}\n{{\n{body}}}\n"

    def _req(self, i):
        return f"{self.m(i, 'ACC_FRAC')} - {self.m(i, 'FRAC')}, {self.fmt_args(i)}"

    def _dense(self, i, a, ins, out):
        (k,), (n,) = ins[0], out
        return (f"    long o, j;\n"
                f"    for (o = 0; o < {n}; ++o) {{\n"
                f"        int64_t acc = {self.wname(i, 'c')}[o];\n"
                f"        for (j = 0; j < {k}; ++j)\n"
                f"            acc += (int64_t)x[j] * {self.wname(i, 'W')}[j * {n} + o];\n"
                f"        y[o] = bll_requantize(acc, {self._req(i)});\n"
                f"    }}\n")

    def _conv2d(self, i, a, ins, out):
        ci, h, w = ins[0]
        co, ho, wo = out
        kh, kw = self.im.records[i]["arrays"]["W"].shape[2:]
        (sh, sw), (ph, pw) = a["stride"], a["padding"]
        return (f"    long o, oh, ow, c, u, v;\n"
                f"    for (o = 0; o < {co}; ++o)\n"
                f"        for (oh = 0; oh < {ho}; ++oh)\n"
                f"            for (ow = 0; ow < {wo}; ++ow) {{\n"
                f"                int64_t acc = {self.wname(i, 'c')}[o];\n"
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
                f"                                   * {self.wname(i, 'W')}"
                f"[((o * {ci} + c) * {kh} + u) * {kw} + v];\n"
                f"                        }}\n"
                f"                    }}\n"
                f"                y[(o * {ho} + oh) * {wo} + ow] = bll_requantize(acc, {self._req(i)});\n"
                f"            }}\n")

    def _scale(self, i, a, ins, out):
        ch = ins[0][0]
        inner = int(np.prod(ins[0][1:]))
        return (f"    long c, k;\n"
                f"    for (c = 0; c < {ch}; ++c)\n"
                f"        for (k = 0; k < {inner}; ++k) {{\n"
                f"            int64_t acc = (int64_t)x[c * {inner} + k] * {self.wname(i, 'W')}[c]\n"
                f"                          + {self.wname(i, 'c')}[c];\n"
                f"            y[c * {inner} + k] = bll_requantize(acc, {self._req(i)});\n"
                f"        }}\n")

    def _relu(self, i, a, ins, out):
        return (f"    long k;\n"
                f"    for (k = 0; k < {self.sizes[i]}; ++k)\n"
                f"        y[k] = x[k] > 0 ? x[k] : 0;\n")

    def _leaky_relu(self, i, a, ins, out):
        return (f"    long k;\n"
                f"    for (k = 0; k < {self.sizes[i]}; ++k) {{\n"
                f"        int64_t v = x[k] > 0 ? (int64_t)x[k]\n"
                f"                  : bll_round_shift((int64_t)x[k] * {self.m(i, 'SLOPE_CODE')}, "
                f"{self.m(i, 'SLOPE_FRAC')}, {self.m(i, 'ROUNDING')});\n"
                f"        y[k] = (int32_t)bll_overflow(v, {self.m(i, 'WIDTH')}, {self.m(i, 'SIGNED')}, "
                f"{self.m(i, 'OVERFLOW')});\n"
                f"    }}\n")

    def _pool(self, i, a, ins, out, init, step, finish):
        c, h, w = ins[0]
        _, ho, wo = out
        (kh, kw), (sh, sw) = a["kernel_size"], a["stride"]
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

    def _maxpool2d(self, i, a, ins, out):
        return self._pool(i, a, ins, out, "int32_t m = win[0];",
                          f"if (win[u * {ins[0][2]} + v] > m) m = win[u * {ins[0][2]} + v];", "m")

    def _avgpool2d(self, i, a, ins, out):
        recip, rshift = int(a["recip"]), int(a["recip_shift"])
        return self._pool(i, a, ins, out, "int64_t s = 0;", f"s += win[u * {ins[0][2]} + v];",
                          f"(int32_t)bll_overflow(\n"
                          f"                    bll_round_shift(s * {_lit(recip, 'int64_t')}, {rshift}, "
                          f"{self.m(i, 'ROUNDING')}),\n"
                          f"                    {self.m(i, 'WIDTH')}, {self.m(i, 'SIGNED')}, "
                          f"{self.m(i, 'OVERFLOW')})")

    def _flatten(self, i, a, ins, out):
        return (f"    long k;\n"
                f"    for (k = 0; k < {self.sizes[i]}; ++k)\n"
                f"        y[k] = x[k];\n")

    def _add(self, i, a, ins, out):
        ja, jb = a["inputs"]
        fa, fb = self.im.formats[ja].frac, self.im.formats[jb].frac
        f = max(fa, fb)       # both operands aligned exactly to the finer one, then one rounding
        return (f"    long k;\n"
                f"    for (k = 0; k < {self.sizes[i]}; ++k) {{\n"
                f"        int64_t acc = bll_round_shift(a[k], {fa - f}, BLL_FLOOR)"
                f" + bll_round_shift(b[k], {fb - f}, BLL_FLOOR);\n"
                f"        y[k] = bll_requantize(acc, {f} - {self.m(i, 'FRAC')}, {self.fmt_args(i)});\n"
                f"    }}\n")

    def _lut(self, i, a, ins, out):
        return (f"    long k;\n"
                f"    for (k = 0; k < {self.sizes[i]}; ++k)\n"
                f"        y[k] = {self.wname(i, 'table')}[(long)x[k] - ({int(a['index_offset'])})];\n")


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def _header(g: _Gen, x, traces) -> str:
    P, p, im = g.P, g.p, g.im
    n_rec = len(im.records)
    f0 = im.formats[0]
    parts = [f"""/* {p}.h: integer-only reference inference, generated by bll_ref exporters.c_header.
 *
 * {n_rec} records (record 0 = input).  Codes are signed (two's complement) integers; a code q of a
 * format with FRAC fractional bits stands for q * 2**-FRAC.  int {p}_run(input, trace) writes
 * the codes of every record into trace[{P}_R<i>_OFFSET .. + {P}_R<i>_SIZE), per sample, in the
 * row-major (C, H, W) / (features,) layout of bll_ref.fixedpoint.IntegerModel.run.
 *
 * Define {P}_IMPLEMENTATION before including to get the weights (done by {p}.c), and
 * {P}_TEST_VECTORS to get the test vectors (done by {p}_test.c).
 */
#ifndef {P}_H
#define {P}_H

#include <stdint.h>

#ifndef BLL_FLOOR
#define BLL_FLOOR 0          /* AP_TRN: toward -inf */
#define BLL_NEAREST 1        /* AP_RND: half toward +inf */
#define BLL_NEAREST_EVEN 2   /* AP_RND_CONV: half to even */
#define BLL_SATURATE 0       /* AP_SAT */
#define BLL_WRAP 1           /* AP_WRAP: keep the low WIDTH bits */
#endif

#define {P}_N_RECORDS {n_rec}
#define {P}_INPUT_SIZE {g.sizes[0]}
#define {P}_OUTPUT_SIZE {g.sizes[-1]}
#define {P}_OUTPUT_OFFSET {g.offsets[-2]}
#define {P}_TRACE_SIZE {g.offsets[-1]}
#define {P}_INPUT_MIN {f0.min_code}
#define {P}_INPUT_MAX {f0.max_code}
#define {P}_N_TEST {x.shape[0]}

/* Integer inference of one sample: input[{P}_INPUT_SIZE] codes -> trace[{P}_TRACE_SIZE].
 * Returns 0, or -1 (trace untouched) if an input code lies outside [INPUT_MIN, INPUT_MAX]. */
int {p}_run(const int32_t *input, int32_t *trace);

"""]
    parts += [g.defines(i) + "\n" for i in range(n_rec)]
    parts.append(f"static const long {p}_offsets[{n_rec + 1}] = {{{', '.join(map(str, g.offsets))}}};\n")
    parts.append(f"static const char *const {p}_kinds[{n_rec}] = {{"
                 + ", ".join(_cstring(r["attrs"]["kind"]) for r in im.records) + "};\n")
    parts.append(f"static const char *const {p}_names[{n_rec}] = {{"
                 + ", ".join(_cstring(r["attrs"]["name"]) for r in im.records) + "};\n\n")
    parts.append(f"#ifdef {P}_IMPLEMENTATION\n")
    parts += [g.weights(i) for i in range(n_rec)]
    parts.append(f"#endif /* {P}_IMPLEMENTATION */\n\n")
    flat = np.concatenate([np.asarray(t).reshape(x.shape[0], -1).astype(np.int64) for t in traces], axis=1)
    rows_in = ",\n".join("    {\n" + _values(s, "int32_t", "        ") + "\n    }"
                         for s in np.asarray(x).reshape(x.shape[0], -1).astype(np.int64))
    rows_tr = ",\n".join("    {\n" + _values(s, "int32_t", "        ") + "\n    }" for s in flat)
    parts.append(f"#ifdef {P}_TEST_VECTORS\n"
                 f"/* input codes of the test samples */\n"
                 f"static const int32_t {p}_test_input[{P}_N_TEST][{P}_INPUT_SIZE] = {{\n{rows_in}\n}};\n"
                 f"/* expected trace (codes of every record, at {P}_R<i>_OFFSET) of each test sample,\n"
                 f"   from bll_ref.fixedpoint.IntegerModel.run */\n"
                 f"static const int32_t {p}_test_trace[{P}_N_TEST][{P}_TRACE_SIZE] = {{\n{rows_tr}\n}};\n"
                 f"#endif /* {P}_TEST_VECTORS */\n\n#endif /* {P}_H */\n")
    return "".join(parts)


def _source(g: _Gen) -> str:
    P, p, im = g.P, g.p, g.im
    kinds = {r["attrs"]["kind"] for r in im.records}
    need_req = bool(kinds & {"dense", "conv2d", "scale", "add"})
    need_rs = need_req or bool(kinds & {"leaky_relu", "avgpool2d"})
    out = [f"/* {p}.c: integer-only reference inference (C99), generated by bll_ref exporters.c_header.\n"
           f"   Bit-exact twin of bll_ref.fixedpoint.IntegerModel.run; see {p}.h. */\n"
           f"#define {P}_IMPLEMENTATION\n#include \"{p}.h\"\n"]
    if need_rs:
        out += [_C_FROM_U64, _C_ROUND_SHIFT]
    if need_req:
        out.append(_C_REQUANTIZE)
    out += ["\n" + g.function(i) for i in range(1, len(im.records))]
    calls = []
    for i in range(1, len(im.records)):
        args = ", ".join(f"trace + {P}_R{j}_OFFSET" for j in im.records[i]["attrs"]["inputs"])
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


def _test_source(g: _Gen) -> str:
    P, p = g.P, g.p
    return f"""/* {p}_test.c: runs the test vectors of {p}.h through {p}_run and compares every record's
   codes with the expected trace (bll_ref.fixedpoint.IntegerModel.run).  Exit status 0 iff all match.
   Usage: {p}_test            compare, print mismatches per record
          {p}_test --dump     also print the traces (lines "T <sample> <record> <codes...>")
          {p}_test --run FILE run the codes in FILE (count, then count * {P}_INPUT_SIZE codes) and
                              print their traces */
#define {P}_TEST_VECTORS
#include "{p}.h"
#include <stdio.h>
#include <string.h>

static int32_t trace[{P}_TRACE_SIZE];
static int32_t input[{P}_INPUT_SIZE];

static void dump(long sample)
{{
    long r, k;
    for (r = 0; r < {P}_N_RECORDS; ++r) {{
        printf("T %ld %ld", sample, r);
        for (k = {p}_offsets[r]; k < {p}_offsets[r + 1]; ++k)
            printf(" %ld", (long)trace[k]);
        printf("\\n");
    }}
}}

static int run_file(const char *path)
{{
    long n, s, k, v;
    FILE *f = fopen(path, "r");
    if (f == NULL) {{
        fprintf(stderr, "{p}_test: cannot open %s\\n", path);
        return 2;
    }}
    if (fscanf(f, "%ld", &n) != 1 || n < 0) {{
        fprintf(stderr, "{p}_test: %s must start with the number of samples\\n", path);
        fclose(f);
        return 2;
    }}
    for (s = 0; s < n; ++s) {{
        for (k = 0; k < {P}_INPUT_SIZE; ++k) {{
            if (fscanf(f, "%ld", &v) != 1) {{
                fprintf(stderr, "{p}_test: %s: sample %ld has fewer than %d codes\\n", path, s,
                        {P}_INPUT_SIZE);
                fclose(f);
                return 2;
            }}
            input[k] = (int32_t)v;
        }}
        if ({p}_run(input, trace) != 0) {{
            fprintf(stderr, "{p}_test: %s: sample %ld has codes outside [%d, %d]\\n", path, s,
                    {P}_INPUT_MIN, {P}_INPUT_MAX);
            fclose(f);
            return 2;
        }}
        dump(s);
    }}
    fclose(f);
    return 0;
}}

int main(int argc, char **argv)
{{
    static long mismatches[{P}_N_RECORDS];
    long s, r, k, total = 0;
    int do_dump = 0;
    if (argc == 3 && strcmp(argv[1], "--run") == 0)
        return run_file(argv[2]);
    if (argc == 2 && strcmp(argv[1], "--dump") == 0)
        do_dump = 1;
    else if (argc != 1) {{
        fprintf(stderr, "usage: %s [--dump | --run FILE]\\n", argv[0]);
        return 2;
    }}
    for (s = 0; s < {P}_N_TEST; ++s) {{
        if ({p}_run({p}_test_input[s], trace) != 0) {{
            fprintf(stderr, "{p}_test: test sample %ld has input codes out of range\\n", s);
            return 2;
        }}
        if (do_dump)
            dump(s);
        for (r = 0; r < {P}_N_RECORDS; ++r)
            for (k = {p}_offsets[r]; k < {p}_offsets[r + 1]; ++k)
                if (trace[k] != {p}_test_trace[s][k])
                    ++mismatches[r];
    }}
    for (r = 0; r < {P}_N_RECORDS; ++r) {{
        printf("record %ld %-10s %-24s mismatches %ld of %ld\\n", r, {p}_kinds[r], {p}_names[r],
               mismatches[r], ({p}_offsets[r + 1] - {p}_offsets[r]) * (long){P}_N_TEST);
        total += mismatches[r];
    }}
    if (total != 0) {{
        printf("FAIL: %ld codes differ from the Python integer trace\\n", total);
        return 1;
    }}
    printf("OK: all %d records match the Python integer trace bit for bit on %d test samples\\n",
           {P}_N_RECORDS, {P}_N_TEST);
    return 0;
}}
"""


def _write_atomic(path: pathlib.Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_c(model, out_dir, *, name="bll_model", test_inputs, traces=None) -> dict:
    """Write ``<name>.h``, ``<name>.c`` and ``<name>_test.c`` (see the module docstring).

    Parameters
    ----------
    model : IntegerModel, or its list of records (rebuilt with ``IntegerModel.from_records``)
    out_dir : str or Path, created if missing; files are written atomically
    name : str, a C identifier; prefixes every file, function and macro
    test_inputs : (N, *input_shape) integer codes of the input format, N >= 1 (a few samples:
        they are embedded in the header with the codes of every record)
    traces : list of arrays or None, the expected trace of ``test_inputs`` (e.g. read from an
        HDF5 export); must equal ``model.run(test_inputs)``.  None: computed here.

    Returns
    -------
    dict with keys "header", "source", "test" -> pathlib.Path
    """
    im = model if isinstance(model, IntegerModel) else IntegerModel.from_records(model)
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"write_c: name must be a C identifier ([A-Za-z_][A-Za-z0-9_]*), got {name!r}")
    if test_inputs is None:
        raise ValueError("write_c needs test_inputs: a few input code samples (N, *input_shape), e.g. "
                         "model.quantize_input(x[:4]); the header embeds them with their traces")
    x = np.asarray(test_inputs)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"write_c: test_inputs must be integer codes, got dtype {x.dtype}; "
                         "use IntegerModel.quantize_input")
    for i, f in enumerate(im.formats):
        if not f.signed and f.width == 32:
            raise ValueError(f"write_c: record {i} has unsigned 32-bit codes, which do not fit the "
                             "int32_t trace buffer")
    ref = im.run(x)                    # validates the shape and the input code range
    if traces is not None:
        if len(traces) != len(ref):
            raise ValueError(f"write_c: traces has {len(traces)} arrays, the model {len(ref)} records")
        for i, (t, r) in enumerate(zip(traces, ref)):
            t = np.asarray(t)
            if t.shape != r.shape or not np.array_equal(t.astype(np.int64), r.astype(np.int64)):
                raise ValueError(f"write_c: traces[{i}] ({im.records[i]['attrs']['kind']} "
                                 f"{im.records[i]['attrs']['name']!r}, shape {t.shape}) differs from "
                                 f"the integer model's run of test_inputs (shape {r.shape}); the traces "
                                 "do not belong to these records and inputs")
    g = _Gen(im, name, [tuple(t.shape[1:]) for t in ref])
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"header": out / f"{name}.h", "source": out / f"{name}.c", "test": out / f"{name}_test.c"}
    _write_atomic(paths["header"], _header(g, x, ref))
    _write_atomic(paths["source"], _source(g))
    _write_atomic(paths["test"], _test_source(g))
    return paths


def find_c_compiler():
    """Path of a C compiler ($CC, cc, gcc or clang), or None."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand:
            exe = shutil.which(shlex.split(cand)[0])
            if exe:
                return cand if cand == os.environ.get("CC") else exe
    return None


def compile_c(out_dir, *, name="bll_model", cc=None, cflags=CFLAGS) -> pathlib.Path:
    """Compile ``<name>.c`` + ``<name>_test.c`` in ``out_dir`` into the test program; returns its
    path.  RuntimeError with the compiler's messages if it fails, or if no compiler is found."""
    cc = cc or find_c_compiler()
    if cc is None:
        raise RuntimeError("compile_c: no C compiler found ($CC, cc, gcc, clang); install one "
                           "(e.g. apt-get install gcc) or pass cc=")
    out = pathlib.Path(out_dir)
    exe = out / (f"{name}_test.exe" if os.name == "nt" else f"{name}_test")
    cmd = [*shlex.split(cc), *cflags, "-o", str(exe), str(out / f"{name}.c"), str(out / f"{name}_test.c")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compile_c: {' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr}")
    return exe
