"""On-device block-local learning in integer arithmetic: the update's specification and its Python
integer twin (the reference the C golden model reproduces bit for bit; docs/on-device-learning.md).

A learned block is one Dense record of an :class:`~bll_ref.fixedpoint.IntegerModel`.  It learns
from its own local error signal only (no gradient crosses a block boundary):

``softmax_ce`` (the output block, what BLL's output learner trains with)
    p = softmax(z) of the logit codes z through an exp table (at most 256 entries), in Q15;
    e = p - onehot(label) (Q15).
``gauss`` (a hidden block: the Gaussian term of Eq. 7 / S8, known variance 1)
    g_phi = -(mu(gamma) - mu(phi)) = h - b with phi = the block's output codes h and the message
    gamma = b = Y W_fb (the closed-form linear feedback of the label, one row of a table);
    e = h - b_label, in the codes' own format.  Linear in the codes: no table, no division.

Both then take one SGD step with learning rate 2**-lr_shift (weights W (in, out), bias c)::

    W[i, o] = sat_W(W[i, o] - round_shift(x[i] * e[o], w_shift))
    c[o]    = sat_32(c[o] - round_shift(e[o], c_shift))

with x the block's input codes, round_shift's ``nearest`` (half toward +inf), w_shift and c_shift
derived from the formats (:func:`plan_learning`).  A learned block keeps its weights at
``width + extra_bits`` bits (the 8-bit codes shifted left by 8: the same numbers, so inference is
unchanged until the first update): at 8 bits most updates are below half a code step and round
to nothing.  Every forward of a step uses the pre-update weights (the BLL step of
``methods/learner.py``), so the order in which blocks update does not matter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import records as R
from .model import IntegerModel
from .qformat import QFormat, div_round, quantize, round_shift

__all__ = ["BlockRule", "LearnSpec", "plan_learning", "learn_step", "softmax_q15", "exp_table",
           "learned_arrays", "parse_learn_blocks", "E_FRAC", "EXP_ENTRIES", "EXTRA_BITS", "ROUNDING", "KINDS"]

E_FRAC = 15              # softmax probabilities and cross-entropy errors: Q15
EXP_ENTRIES = 256        # the exp table's longest length
EXTRA_BITS = 8           # a learned block's weights: width + 8 bits
ROUNDING = "nearest"     # every rounding of the update: half toward +inf
KINDS = ("softmax_ce", "gauss")
_I32 = (-(1 << 31), (1 << 31) - 1)


@dataclass(frozen=True)
class BlockRule:
    """How one block learns: its Dense record ``record`` reads record ``x_record``; ``kind`` in
    :data:`KINDS`; the learning rate is 2**-lr_shift; W and c updates shift by w_shift, c_shift."""

    block: int
    record: int
    x_record: int
    kind: str
    lr_shift: int
    w_shift: int
    c_shift: int


@dataclass(eq=False)
class LearnSpec:
    """Plain data of an on-device learning plan (what the C generator needs).

    Attributes
    ----------
    rules : list of BlockRule, in block order
    n_classes : int, the model's output size
    exp_table : (L,) int64 or None
        E[j] = round(2**15 exp(-j 2**exp_shift 2**-frac_z)), looked up at j = round_shift(d,
        exp_shift) of the logit code difference d = max(z) - z (E = 0 for j >= L); None when no
        softmax_ce block learns
    feedback : dict record -> (n_classes, units) int64 message codes b in that record's format
    exp_shift : int, see exp_table
    """

    rules: list
    n_classes: int
    exp_table: np.ndarray | None
    feedback: dict
    exp_shift: int = 0


def parse_learn_blocks(text, n_blocks) -> list:
    """``"3"``, ``"2,3"`` or ``"all"`` (blocks counted from 1, as bll-ref train reports them) ->
    sorted 0-based block indices; ValueError naming a block that does not exist."""
    if str(text).strip().lower() == "all":
        return list(range(n_blocks))
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= n_blocks:
            raise ValueError(f"--learn-blocks: block {part!r} does not exist; the model has blocks "
                             f"1..{n_blocks} (give e.g. {n_blocks} or 2,{n_blocks} or all)")
        out.add(int(part) - 1)
    return sorted(out)


def exp_table(frac_z, width_z):
    """(E, k): E[j] = round_half_up(2**15 exp(-j 2**k 2**-frac_z)) for j = 0, 1, ... while E[j] > 0,
    for the logit code difference d = max(z) - z looked up at j = round_shift(d, k, nearest).
    k >= 0 is the smallest shift that keeps the table at most EXP_ENTRIES long (k = 0 for 8-bit
    logits at frac <= 4; 16-bit logits need k > 0).  Computed once, in float64, at export; the
    device only reads it."""
    for k in range(0, 64):
        j_max = int(round_shift(np.int64((1 << width_z) - 1), k, ROUNDING))   # the largest reachable j
        n = min(j_max + 1, EXP_ENTRIES + 1)
        j = np.arange(n, dtype=np.float64)
        E = np.floor(np.ldexp(np.exp(-np.ldexp(j, k - frac_z)), E_FRAC) + 0.5).astype(np.int64)
        L = int(np.count_nonzero(E > 0))
        if L <= EXP_ENTRIES:
            return E[:L], k
    raise ValueError(f"no exp table for logits of {width_z} bits at frac {frac_z}")


def softmax_q15(z, table, k=0) -> np.ndarray:
    """(out,) logit codes -> p in Q15: E_j = table[round_shift(max(z) - z_j, k)] (0 past the table),
    p_j = div_round(E_j * 2**15, sum_j E_j, nearest).  int64."""
    z = np.asarray(z, np.int64)
    d = round_shift(z.max() - z, k, ROUNDING)
    E = np.where(d < len(table), table[np.minimum(d, len(table) - 1)], 0)
    return div_round(E << E_FRAC, int(E.sum()), ROUNDING)


def _block_records(im, block):
    recs = [(i, r) for i, r in enumerate(im.records) if r.block == block]
    dense = [(i, r) for i, r in recs if isinstance(r, R.Affine)]
    if len(dense) != 1 or not isinstance(dense[0][1], R.Dense):
        kinds = ", ".join(r.kind for _, r in recs) or "no records"
        raise ValueError(f"block {block + 1} ({kinds}) cannot learn on the device: only a block with "
                         "exactly one Dense record (and its activation) learns")
    return dense[0]


def _shifts(rule_kind, x_fmt, e_frac, e_max, rec, lr_shift, block):
    """(w_shift, c_shift) of one block, with the checks that the int32 update cannot overflow and
    that not every update rounds to zero."""
    x_max = x_fmt.max_abs_code
    w_shift = x_fmt.frac + e_frac + lr_shift - rec.w_fmt.frac
    c_shift = e_frac + lr_shift - rec.acc_frac
    where = f"block {block + 1} ({rule_kind}), learning rate 2**-{lr_shift}"
    # |x e| must fit int32, and the shifted update below 2**30 so that W - update cannot leave int32
    fits = lambda prod, sh: (prod << -sh if sh < 0 else prod >> sh) < 1 << 30   # noqa: E731
    for name, prod, sh in (("weight", x_max * e_max, w_shift), ("bias", e_max, c_shift)):
        if prod >= 1 << 31:
            raise ValueError(f"{where}: |x e| up to {prod} does not fit the int32 accumulator; the block's "
                             "input or error format is too wide for the on-device update")
        if not fits(prod, sh):
            need = lr_shift + next(k for k in range(1, 64) if fits(prod, sh + k))
            raise ValueError(f"{where}: the {name} update (|x e| up to {prod}) times 2**{-sh} "
                             f"overflows the int32 accumulator; use --lr-shift {need} or more")
    if w_shift >= 1 and x_max * e_max < 1 << (w_shift - 1):
        raise ValueError(f"{where}: every weight update (|x e| up to {x_max * e_max}) rounds to zero after "
                         f"the {w_shift}-bit shift; use a smaller --lr-shift")
    return w_shift, c_shift


def plan_learning(model, learn_blocks, lr_shifts, *, feedback=None, extra_bits=EXTRA_BITS):
    """Check a learning plan and widen the learned blocks' weights.

    Parameters
    ----------
    model : IntegerModel (e.g. ``ExportedModel.integer_model()``); it is not modified
    learn_blocks : list of 0-based block indices (:func:`parse_learn_blocks`)
    lr_shifts : int or list of int (one per learned block): learning rate 2**-s (s < 0: above 1)
    feedback : dict block -> (n_classes, units) float message rows b (the closed-form linear feedback
        of the label, fitted on the host); required for every learned hidden block
    extra_bits : int, bits added to the learned blocks' weights

    Returns
    -------
    (IntegerModel, LearnSpec): the model with the learned Dense records widened (W << extra_bits at
    frac + extra_bits, c << extra_bits, acc_frac + extra_bits: every inference code unchanged), and
    the plan.  ValueError for a block that does not exist or cannot learn, a learning rate that
    overflows the accumulator or always rounds to zero, a missing or misshapen feedback table.
    """
    im = model if isinstance(model, IntegerModel) else IntegerModel.from_records(model)
    blocks = sorted({r.block for r in im.records if r.block is not None and r.block >= 0})
    n_blocks = len(blocks)
    learn_blocks = [int(b) for b in learn_blocks]
    if len(set(learn_blocks)) != len(learn_blocks):
        raise ValueError(f"learn_blocks {[b + 1 for b in learn_blocks]} names a block twice")
    if not learn_blocks or any(b not in blocks for b in learn_blocks):
        raise ValueError(f"learn_blocks {[b + 1 for b in learn_blocks]}: the model has blocks 1..{n_blocks}")
    shifts = list(lr_shifts) if isinstance(lr_shifts, (list, tuple)) else [lr_shifts] * len(learn_blocks)
    if len(shifts) != len(learn_blocks) or any(isinstance(s, bool) or int(s) != s for s in shifts):
        raise ValueError(f"lr_shifts must be one integer per learned block "
                         f"({len(learn_blocks)}), got {lr_shifts!r}")
    out_fmt = im.output_fmt
    n_classes = int(np.prod(im.run(np.zeros((1, *im.records[0].shape), np.int64))[-1].shape[1:]))
    if n_classes >= 1 << 15:
        raise ValueError(f"{n_classes} outputs: the Q15 softmax sum needs fewer than 32768 classes")
    records = list(im.records)
    rules, fb_codes, table, exp_shift = [], {}, None, 0
    feedback = feedback or {}
    for b, s in zip(learn_blocks, shifts):
        i, rec = _block_records(im, b)
        if b == blocks[-1] and i != len(records) - 1:
            raise ValueError(f"block {b + 1} is the output block: it learns from softmax cross-entropy of its "
                             "Dense record's codes, which must be the model's output (no layer after it)")
        if rec.w_frac is not None:
            raise ValueError(f"block {b + 1}: per-channel weight formats cannot learn on the device; "
                             "export without --per-channel")
        wide = rec.w_fmt.width + extra_bits
        if not 8 < wide <= 16:
            raise ValueError(f"block {b + 1}: {rec.w_fmt.width}-bit weights + {extra_bits} learning bits "
                             "must make 9..16 bits (int16 in RAM); export at --width 8")
        x_fmt = im.formats[rec.inputs[0]]
        w_fmt = QFormat(wide, rec.w_fmt.frac + extra_bits, True, rec.w_fmt.rounding, "saturate")
        widened = R.Dense(name=rec.name, inputs=rec.inputs, out_fmt=rec.out_fmt, block=rec.block,
                          info=rec.info, extra=rec.extra, w_fmt=w_fmt, acc_frac=rec.acc_frac + extra_bits,
                          W=rec.W.astype(np.int64) << extra_bits, c=np.asarray(rec.c, np.int64) << extra_bits)
        if i == len(records) - 1:
            kind, e_frac, e_max = "softmax_ce", E_FRAC, 1 << E_FRAC
            if out_fmt.width > 16:
                raise ValueError("the output block learns through an exp table of its logit codes, "
                                 f"which needs logits of at most 16 bits, not {out_fmt.width}")
            table, exp_shift = exp_table(out_fmt.frac, out_fmt.width)
        else:
            kind, e_frac = "gauss", rec.out_fmt.frac
            e_max = rec.out_fmt.max_code - rec.out_fmt.min_code
            units = rec.W.shape[1]
            fb = feedback.get(b)
            if fb is None:
                raise ValueError(f"block {b + 1} is hidden: its gauss term needs the feedback message "
                                 f"table ({n_classes}, {units}) (feedback={{{b}: ...}})")
            fb = np.asarray(fb, np.float64)
            if fb.shape != (n_classes, units) or not np.all(np.isfinite(fb)):
                raise ValueError(f"block {b + 1}: feedback must be finite ({n_classes}, {units}), got {fb.shape}")
            fb_codes[i] = quantize(fb, rec.out_fmt).astype(np.int64)
        w_shift, c_shift = _shifts(kind, x_fmt, e_frac, e_max, widened, int(s), b)
        rules.append(BlockRule(b, i, rec.inputs[0], kind, int(s), w_shift, c_shift))
        records[i] = widened
    return IntegerModel(records), LearnSpec(rules, n_classes, table, fb_codes, exp_shift)


def learn_step(im, spec, x_codes, label) -> dict:
    """One on-device step: integer inference of ``x_codes`` (``(1, *input_shape)`` codes) with the
    current weights, then every learned block's update, in place in ``im``'s records.

    Returns a dict: ``logits`` (codes before the update), ``loss`` (-log p_label from the Q15
    softmax, float, for reporting only; None when the output block does not learn).
    ValueError for a label outside 0..n_classes-1."""
    if isinstance(label, bool) or int(label) != label or not 0 <= int(label) < spec.n_classes:
        raise ValueError(f"label {label!r} is outside the classes 0..{spec.n_classes - 1}")
    y = int(label)
    trace = im.run(x_codes)
    loss = None
    for rule in spec.rules:
        rec = im.records[rule.record]
        x = trace[rule.x_record].reshape(-1).astype(np.int64)
        out = trace[rule.record].reshape(-1).astype(np.int64)
        if rule.kind == "softmax_ce":
            p = softmax_q15(out, spec.exp_table, spec.exp_shift)
            loss = -math.log(max(int(p[y]), 1) / (1 << E_FRAC))
            e = p.copy()
            e[y] -= 1 << E_FRAC                       # e = p - onehot(label), Q15
        else:
            e = out - spec.feedback[rule.record][y]   # Eq. 7 Gaussian: g_phi = h - b
        dW = round_shift(np.outer(x, e), rule.w_shift, ROUNDING)
        rec.W = np.clip(rec.W.astype(np.int64) - dW, rec.w_fmt.min_code, rec.w_fmt.max_code).astype(rec.W.dtype)
        rec.c = np.clip(rec.c - round_shift(e, rule.c_shift, ROUNDING), *_I32)
    return {"logits": trace[-1].reshape(-1).astype(np.int64), "loss": loss}


def learned_arrays(im, spec) -> list:
    """[(label, int64 codes)] of every learned array, W then c per block in block order: what the
    device reports after each step."""
    out = []
    for rule in spec.rules:
        rec = im.records[rule.record]
        out += [(f"r{rule.record}.W", rec.W.reshape(-1).astype(np.int64)),
                (f"r{rule.record}.c", np.asarray(rec.c, np.int64))]
    return out
