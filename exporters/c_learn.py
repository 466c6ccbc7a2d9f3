"""C99 on-device learning: ``bll_learn_step`` (the C twin of ``bll_ref.fixedpoint.learn.learn_step``)
next to the C golden model of ``exporters.c_header``.

``write_learn_c(model, spec, out_dir, name=..., test_inputs=...)`` writes the golden model
(``<name>.h``, ``<name>.c``, ``<name>_test.c``) with the learned blocks' weight and bias arrays made
writable (``static`` without ``const``: they live in RAM, initialised from flash at start-up), and

``<name>_learn.h``
    ``int bll_learn_step(const int32_t *x_codes, int32_t label, int32_t *trace)``: inference of one
    sample into ``trace`` (the inference's own buffer: the update keeps no other activation), then
    every learned block's update in place.  Returns 0, -1 (input codes outside the input format,
    nothing changed) or -2 (label outside 0..N_CLASSES-1, nothing changed).  ``bll_learn_arrays``
    lists the learned arrays (for a host that reads them back).
``<name>_learn.c``
    one translation unit: ``#include "<name>.c"`` (the model's static weights and the rounding
    helpers), the exp table and feedback tables (const: flash), one static function per learned
    block.  No heap, no floating point; int32 arithmetic (the plan's checks bound every product
    and shift), the bias in the model's int64.
"""
from __future__ import annotations

import pathlib

import numpy as np

from bll_ref.fileio import atomic_open
from bll_ref.fixedpoint import IntegerModel
from bll_ref.fixedpoint.learn import E_FRAC

from .c_golden import _array
from .c_header import write_c

__all__ = ["write_learn_c", "LEARN_FILES"]

LEARN_FILES = ("{name}_learn.h", "{name}_learn.c")
_CTYPE = {"int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "uint8": "uint8_t", "uint16": "uint16_t"}

_C_HELPERS = """
/* fixedpoint.round_shift(v, s, "nearest") on int32: floor(v / 2**s) + (remainder >= 2**(s-1));
   s <= 0 is an exact left shift, v * 2**-s (the plan bounds it below 2**30). */
static int32_t bll_learn_rs(int32_t v, int s)
{
    int32_t q;
    uint32_t r;
    if (s <= 0)
        return v * ((int32_t)1 << -s);
    q = v >= 0 ? (int32_t)((uint32_t)v >> s) : -(int32_t)((uint32_t)(-(v + 1)) >> s) - 1;
    r = (uint32_t)v & ((1u << s) - 1u);
    return q + (r >= (1u << (s - 1)));
}

/* fixedpoint.div_round(n, k, "nearest") for n >= 0, k > 0 (C's / and % are floor here). */
static int32_t bll_learn_div(int32_t n, int32_t k)
{
    int32_t q = n / k, r = n % k;
    return q + (2 * r >= k);
}

/* c - d saturated to int32 (the bias codes stay int64 in the model). */
static int64_t bll_learn_bias(int64_t c, int32_t d)
{
    int64_t v = c - d;
    return v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v);
}
"""


def _writable(header: pathlib.Path, names):
    """Drop ``const`` from the declarations of ``names`` in the model header (they learn)."""
    text = header.read_text()
    for n in names:
        hits = [ln for ln in text.splitlines() if ln.startswith("static const ") and f" {n}[" in ln]
        if len(hits) != 1:
            raise ValueError(f"write_learn_c: expected one declaration of {n} in {header}, found {len(hits)}")
        text = text.replace(hits[0], hits[0].replace("static const ", "static ", 1))
    with atomic_open(header, "wb") as f:
        f.write(text.encode("ascii"))


def _softmax_ce(p, i, rule, rec, n_in, n_out, n_exp, k):
    W, c = f"{p}_r{i}_W", f"{p}_r{i}_c"
    lo, hi = rec.w_fmt.min_code, rec.w_fmt.max_code
    return f"""
/* record {i} (block {rule.block + 1}): softmax cross-entropy with the label, learning rate 2**-{rule.lr_shift}.
   p = div_round(E[round_shift(max z - z, {k})] << 15, sum E) (Q15), e = p - onehot(label). */
static void {p}_learn_r{i}(const int32_t *x, const int32_t *z, int32_t label)
{{
    int32_t e[{n_out}], zmax = z[0], s = 0;
    long i, j;
    for (j = 1; j < {n_out}; ++j)
        if (z[j] > zmax)
            zmax = z[j];
    for (j = 0; j < {n_out}; ++j) {{
        int32_t d = bll_learn_rs(zmax - z[j], {k});
        e[j] = d < {n_exp} ? {p}_learn_exp[d] : 0;
        s += e[j];
    }}
    for (j = 0; j < {n_out}; ++j)
        e[j] = bll_learn_div(e[j] << {E_FRAC}, s) - (j == label ? {1 << E_FRAC} : 0);
    for (j = 0; j < {n_out}; ++j)
        {c}[j] = bll_learn_bias({c}[j], bll_learn_rs(e[j], {rule.c_shift}));
    for (i = 0; i < {n_in}; ++i) {{
        int32_t xi = x[i];
        int16_t *w = {W} + i * {n_out};
        if (xi == 0)
            continue;                      /* round_shift(0) = 0: exact to skip */
        for (j = 0; j < {n_out}; ++j) {{
            int32_t v = w[j] - bll_learn_rs(xi * e[j], {rule.w_shift});
            w[j] = (int16_t)(v < {lo} ? {lo} : (v > {hi} ? {hi} : v));
        }}
    }}
}}
"""


def _gauss(p, i, rule, rec, n_in, n_out):
    W, c = f"{p}_r{i}_W", f"{p}_r{i}_c"
    lo, hi = rec.w_fmt.min_code, rec.w_fmt.max_code
    return f"""
/* record {i} (block {rule.block + 1}): Gaussian term (Eq. 7), e = h - b[label], learning rate 2**-{rule.lr_shift}.
   e is recomputed per output unit: no error buffer. */
static void {p}_learn_r{i}(const int32_t *x, const int32_t *h, int32_t label)
{{
    const {p}_fb_r{i}_t *b = {p}_learn_fb_r{i} + (long)label * {n_out};
    long i, o;
    for (o = 0; o < {n_out}; ++o) {{
        int32_t e = h[o] - (int32_t)b[o];
        if (e == 0)
            continue;                      /* round_shift(0) = 0: exact to skip */
        {c}[o] = bll_learn_bias({c}[o], bll_learn_rs(e, {rule.c_shift}));
        for (i = 0; i < {n_in}; ++i) {{
            int32_t v;
            if (x[i] == 0)
                continue;
            v = {W}[i * {n_out} + o] - bll_learn_rs(x[i] * e, {rule.w_shift});
            {W}[i * {n_out} + o] = (int16_t)(v < {lo} ? {lo} : (v > {hi} ? {hi} : v));
        }}
    }}
}}
"""


def _learn_header(p, spec, im) -> str:
    n = 2 * len(spec.rules)
    return f"""/* {p}_learn.h: on-device block-local learning for {p}.h, generated by bll_ref exporters.c_learn.
   The update is specified in docs/on-device-learning.md; bll_ref.fixedpoint.learn is its twin. */
#ifndef {p.upper()}_LEARN_H
#define {p.upper()}_LEARN_H
#include <stdint.h>
#include "{p}.h"

#define BLL_LEARN_N_CLASSES {spec.n_classes}
#define BLL_LEARN_N_ARRAYS {n}

/* a learned array: weight codes (w, int16) or bias codes (c, int64), n of them */
typedef struct {{
    const char *name;
    const int16_t *w;
    const int64_t *c;
    long n;
}} bll_learn_array;

extern const bll_learn_array bll_learn_arrays[BLL_LEARN_N_ARRAYS];

/* One step: inference of x_codes[{p.upper()}_INPUT_SIZE] into trace[{p.upper()}_TRACE_SIZE] with the
   current weights, then the update of every learned block.  0, -1 (input codes out of range) or
   -2 (label outside 0..BLL_LEARN_N_CLASSES-1); nothing changes on -1 / -2. */
int bll_learn_step(const int32_t *x_codes, int32_t label, int32_t *trace);

#endif
"""


def _learn_source(p, spec, im, shapes) -> str:
    P = p.upper()
    parts = [f"/* {p}_learn.c: on-device block-local learning (C99, integer only), generated by bll_ref\n"
             f"   exporters.c_learn; see {p}_learn.h.  One translation unit with the model: the learned\n"
             f"   blocks' arrays are the model's own (static, writable). */\n"
             f"#include \"{p}.c\"\n#include \"{p}_learn.h\"\n", _C_HELPERS]
    if spec.exp_table is not None:
        parts.append(f"\n/* E[j] = round(2**15 exp(-j 2**{spec.exp_shift} 2**-FRAC)) of the logit format, E[j] = 0 "
                     f"for j >= {len(spec.exp_table)} */\n" + _array("int32_t", f"{p}_learn_exp", spec.exp_table))
    calls, arrays = [], []
    for rule in spec.rules:
        i, rec = rule.record, im.records[rule.record]
        n_in, n_out = int(np.prod(shapes[rule.x_record])), int(np.prod(shapes[i]))
        if rule.kind == "softmax_ce":
            parts.append(_softmax_ce(p, i, rule, rec, n_in, n_out, len(spec.exp_table), spec.exp_shift))
        else:
            ct = _CTYPE[rec.out_fmt.code_dtype.name]
            parts.append(f"\n/* record {i} feedback message b = Y W_fb, one row per class, codes of the "
                         f"record's output format */\ntypedef {ct} {p}_fb_r{i}_t;\n"
                         + _array(ct, f"{p}_learn_fb_r{i}", spec.feedback[i]) + _gauss(p, i, rule, rec, n_in, n_out))
        calls.append(f"    {p}_learn_r{i}(trace + {P}_R{rule.x_record}_OFFSET, trace + {P}_R{i}_OFFSET, label);")
        arrays += [f'    {{"r{i}.W", {p}_r{i}_W, 0, {n_in * n_out}}},', f'    {{"r{i}.c", 0, {p}_r{i}_c, {n_out}}},']
    parts.append(f"""
const bll_learn_array bll_learn_arrays[BLL_LEARN_N_ARRAYS] = {{
{chr(10).join(arrays)}
}};

int bll_learn_step(const int32_t *x_codes, int32_t label, int32_t *trace)
{{
    if (label < 0 || label >= BLL_LEARN_N_CLASSES)
        return -2;
    if ({p}_run(x_codes, trace) != 0)
        return -1;
    /* every forward code above used the pre-update weights; each block now learns on its own */
{chr(10).join(calls)}
    return 0;
}}
""")
    return "".join(parts)


def write_learn_c(model, spec, out_dir, *, name="bll_model", test_inputs) -> dict:
    """Write the golden model with writable learned arrays and ``<name>_learn.{h,c}``.

    model : the IntegerModel returned by ``plan_learning`` (learned blocks widened); spec : its
    LearnSpec; test_inputs : a few input codes for the model header's test vectors.
    Returns the paths (``write_c``'s, plus "learn_header", "learn_source")."""
    im = model if isinstance(model, IntegerModel) else IntegerModel.from_records(model)
    shapes = [tuple(t.shape[1:]) for t in im.run(np.asarray(test_inputs)[:1])]
    paths = write_c(im, out_dir, name=name, test_inputs=test_inputs)
    _writable(paths["header"], [f"{name}_r{r.record}_{k}" for r in spec.rules for k in ("W", "c")])
    out = pathlib.Path(out_dir)
    paths["learn_header"], paths["learn_source"] = out / f"{name}_learn.h", out / f"{name}_learn.c"
    for key, text in (("learn_header", _learn_header(name, spec, im)),
                      ("learn_source", _learn_source(name, spec, im, shapes))):
        with atomic_open(paths[key], "wb") as f:
            f.write(text.encode("ascii"))
    return paths
