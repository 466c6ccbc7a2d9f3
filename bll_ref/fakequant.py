"""Fake quantisation: the float model with the integer model's rounding put back in, so that
``bll_ref.quant_finetune`` can train for the integer model ``bll-ref export --width W`` makes::

    input        x  -> Q(x, input_fmt)
    Dense/Conv2d W  -> Q(W, w_fmt) (per tensor, or per output channel), c -> Q(c, acc_frac),
                 y  = x W + c, then Q(y, out_fmt) (saturating) -- in the block's activation
                      when one follows (so the local losses see the unrounded pre-activation a)
    ReLU, MaxPool2d, Flatten: exact on the quantisation grid; LeakyReLU: the integer slope code
    and its rounding (``fixedpoint.records.LeakyReLU``)

where Q(v, fmt) = dequantize(quantize(v, fmt)).  Weight formats are those ``compile_integer``
picks for the current weights (recomputed at every step); activation formats come from an
:class:`~bll_ref.fixedpoint.IntegerModel` (:meth:`FakeQuantModel.set_formats`).  So in float64 the
forward pass equals the integer model's trace bit for bit (a test pins it); in float32 sums may
round differently at rare ties.

Gradients pass Q by the straight-through estimator (Bengio et al. 2013): dQ(v)/dv = 1 where v
lies inside the format's range, 0 where it saturates (clipped STE); dQ(W)/dW = 1 (weight formats
fit every weight).
"""
from __future__ import annotations

import numpy as np

from . import layers as L
from .fixedpoint.calibrate import calibrate_weight, calibrate_weight_per_channel
from .fixedpoint.qformat import round_float
from .layers.base import Layer
from .losses.output import softmax_cross_entropy

__all__ = ["fake_quant", "FakeQuantModel", "fake_quant_model", "quantized_loss"]


def _fq(v, frac, lo, hi, rounding):
    """Q(v) at ``frac`` fractional bits (scalar or broadcastable array), saturated to codes
    [lo, hi], in v's float dtype: the scaling by 2**frac is exact and ``round_float`` rounds
    exactly, so this equals dequantize(quantize(v)) (a test pins it) at a fraction of its cost."""
    scale = np.ldexp(np.ones((), v.dtype), frac).astype(v.dtype, copy=False)
    r = round_float(v * scale, rounding)
    return np.clip(r, lo, hi, out=r) / scale


def fake_quant(x, fmt):
    """(Q(x), mask): x rounded to ``fmt``'s grid and saturated, in x's dtype, and the STE mask
    (True where x lies inside the format's range [min_code, max_code] * 2**-frac)."""
    x = np.asarray(x)
    if fmt.overflow != "saturate":
        raise ValueError("fake-quantised training needs overflow='saturate' (a wrapped value has no gradient)")
    xq = _fq(x, fmt.frac, fmt.min_code, fmt.max_code, fmt.rounding).astype(x.dtype, copy=False)
    lo, hi = np.ldexp(float(fmt.min_code), -fmt.frac), np.ldexp(float(fmt.max_code), -fmt.frac)
    return xq, (x >= lo) & (x <= hi)


def _fq_weights(W, out_axis, width, rounding, per_channel):
    """Q(W) with the weight format(s) compile_integer would choose; returns (Wq in W's dtype,
    w_frac (out,))."""
    W = np.asarray(W)
    if per_channel:
        fmt, fracs = calibrate_weight_per_channel(W, width, out_axis, rounding=rounding)
    else:
        fmt = calibrate_weight(W, width, rounding=rounding)
        fracs = np.full(W.shape[out_axis], fmt.frac, dtype=np.int64)
    shape = [1] * W.ndim
    shape[out_axis] = -1
    return _fq(W, fracs.reshape(shape), fmt.min_code, fmt.max_code, rounding), fracs


class _FQAffine(Layer):
    """A Dense / Conv2d with fake-quantised weights and bias, and (unless its block's activation
    does it) fake-quantised output.  Shares the wrapped layer's params and grads, so optimisers
    made for it update the float layer; the quantised values live in the layer's arrays only
    between forward(train=True) and backward."""

    takes_need_dx = True

    def __init__(self, layer, width, rounding, per_channel):
        self._cache = None                          # params / grads / buffers are the layer's
        self.layer, self.width, self.rounding, self.per_channel = layer, width, rounding, per_channel
        self.out_axis = 1 if isinstance(layer, L.Dense) else 0
        self.in_fmt = self.out_fmt = None          # set by set_formats
        self._saved = None
        self._mask = None

    params = property(lambda self: self.layer.params)
    grads = property(lambda self: self.layer.grads)
    buffers = property(lambda self: self.layer.buffers)

    def zero_grads(self):
        self.layer.zero_grads()

    def set_formats(self, in_fmt, out_fmt):
        """Input format (for the bias's acc_frac) and output format (None: the activation after
        this layer quantises)."""
        self.in_fmt, self.out_fmt = in_fmt, out_fmt

    def _restore(self):
        if self._saved is not None:
            for k, v in self._saved.items():
                self.layer.params[k][...] = v
            self._saved = None

    def quantized_params(self):
        """{"W": Q(W), "c": Q(c at in_frac + w_frac)} as float64 (c per channel when per-channel)."""
        p = self.layer.params
        Wq, fracs = _fq_weights(p["W"], self.out_axis, self.width, self.rounding, self.per_channel)
        out = {"W": Wq}
        if "c" in p:                               # as compile_integer: round(c * 2**acc_frac)
            acc = self.in_fmt.frac + fracs
            out["c"] = np.ldexp(round_float(np.ldexp(np.asarray(p["c"], np.float64), acc), self.rounding), -acc)
        return out

    def forward(self, x, train=True):
        self._restore()
        saved = {k: v.copy() for k, v in self.layer.params.items()}
        for k, v in self.quantized_params().items():
            self.layer.params[k][...] = v
        self._saved = saved                  # backward uses Q(W) for dx, then restores
        try:
            y = self.layer.forward(x, train=train)
        finally:
            if not train:
                self._restore()
        self._mask = None
        if self.out_fmt is not None:
            y, mask = fake_quant(y, self.out_fmt)
            if train:
                self._mask = mask
        return y

    def backward(self, dy, need_dx=True):
        if self._saved is None:
            raise RuntimeError("fake-quantised layer: backward needs a forward(x, train=True) first")
        if self._mask is not None:
            dy = dy * self._mask                    # clipped STE
        try:
            return self.layer.backward(dy, need_dx=need_dx)
        finally:
            self._restore()                         # the optimiser steps the float weights

    def config(self):
        return self.layer.config()


class _FQReLU(L.ReLU):
    """ReLU whose input is first fake-quantised to ``in_fmt`` (the Dense/Conv2d's output format)
    when ``in_fmt`` is set: y = Q(relu(x)) = relu(Q(x)) as in the integer model."""

    def __init__(self, in_fmt=None):
        super().__init__()
        self.in_fmt = in_fmt

    def forward(self, x, train=True):
        keep = np.ones(x.shape, bool)
        if self.in_fmt is not None:
            x, keep = fake_quant(x, self.in_fmt)
        y = np.maximum(x, 0).astype(x.dtype, copy=False)
        if train:
            self._cache = keep & (x > 0)
        return y

    def backward(self, dy):
        mask = self._cached()
        return (self._check_dy(dy, mask.shape) * mask).astype(dy.dtype, copy=False)


class _FQLeakyReLU(L.LeakyReLU):
    """LeakyReLU in the integer model's arithmetic: y = x if x > 0 else Q(x * slope_q, fmt), with
    slope_q = slope_code * 2**-slope_frac; x first fake-quantised to ``fmt`` when ``quant_in``."""

    def __init__(self, slope, fmt=None, slope_q=None, quant_in=False):
        super().__init__(slope)
        self.fmt, self.slope_q, self.quant_in = fmt, slope_q, quant_in

    def forward(self, x, train=True):
        keep = np.ones(x.shape, bool)
        if self.quant_in:
            x, keep = fake_quant(x, self.fmt)
        pos = x > 0
        neg = fake_quant(x * x.dtype.type(self.slope_q), self.fmt)[0]
        y = np.where(pos, x, neg).astype(x.dtype, copy=False)
        if train:
            self._cache = (pos, keep)
        return y

    def backward(self, dy):
        pos, keep = self._cached()
        self._check_dy(dy, pos.shape)
        return (np.where(pos, dy, dy * dy.dtype.type(self.slope_q)) * keep).astype(dy.dtype, copy=False)


class FakeQuantModel:
    """The fake-quantised blocks of a float model (``blocks``: list of Sequential sharing the float
    model's parameters) and what sets their formats from an :class:`IntegerModel`."""

    def __init__(self, model, width, rounding="nearest", per_channel=False):
        self.width, self.rounding, self.per_channel = width, rounding, per_channel
        self.blocks, self._slots = [], []       # slots: (record name, wrapper, role)
        for k, block in enumerate(model):
            layers = list(block.layers) if isinstance(block, L.Sequential) else [block]
            self.blocks.append(L.Sequential(*self._wrap_block(k, layers)))
        self.input_fmt = None

    def _wrap_block(self, k, layers):
        out, pending = [], None            # pending: an affine whose activation quantises its output
        last = len(layers) - 1
        for j, layer in enumerate(layers):
            name = f"{k}.{j}"
            if isinstance(layer, (L.Dense, L.Conv2d)):
                if j < last and isinstance(layers[j + 1], L.BatchNorm):
                    raise ValueError(f"finetune-q: layer {name} is followed by a BatchNorm; fold it first "
                                     "with quant_finetune.fold_batchnorms(model) (bll-ref finetune-q does)")
                w = _FQAffine(layer, self.width, self.rounding, self.per_channel)
                rest = layers[j + 1:]
                defer = (bool(rest) and isinstance(rest[-1], (L.ReLU, L.LeakyReLU))
                         and all(isinstance(r, (L.MaxPool2d, L.Flatten)) for r in rest[:-1]))
                self._slots.append((name, w, "affine_deferred" if defer else "affine"))
                pending = name if defer else None
                out.append(w)
            elif isinstance(layer, L.LeakyReLU):
                w = _FQLeakyReLU(layer.slope, quant_in=pending is not None and j == last)
                self._slots.append((name, w, ("leaky", pending if j == last else None)))
                out.append(w)
            elif isinstance(layer, L.ReLU):
                w = _FQReLU()
                self._slots.append((name, w, ("relu", pending if j == last else None)))
                out.append(w)
            elif isinstance(layer, (L.MaxPool2d, L.Flatten)):
                out.append(layer)          # exact on the quantisation grid (max, reshape)
            else:
                raise ValueError(f"finetune-q: layer {name} ({type(layer).__name__}) has no fake-quantised "
                                 "version; supported: Dense, Conv2d, ReLU, LeakyReLU, MaxPool2d, Flatten")
        return out

    def set_formats(self, im):
        """Activation formats (and the input formats of the weights' biases) from ``im``, an
        IntegerModel compiled from the float model these blocks share."""
        by_name = {r.name: (i, r) for i, r in enumerate(im.records)}
        self.input_fmt = im.input_fmt
        for name, w, role in self._slots:
            if name not in by_name:
                raise ValueError(f"finetune-q: no integer record named {name!r}; the model and its "
                                 "integer compilation disagree")
            i, rec = by_name[name]
            if role in ("affine", "affine_deferred"):
                w.set_formats(im.formats[rec.inputs[0]], None if role == "affine_deferred" else rec.out_fmt)
            elif role[0] == "relu":
                w.in_fmt = by_name[role[1]][1].out_fmt if role[1] else None
            else:
                w.fmt = rec.out_fmt
                w.slope_q = float(np.ldexp(float(rec.slope_code), -rec.slope_frac))

    def quantize_input(self, x):
        return fake_quant(x, self.input_fmt)[0]

    def forward(self, x):
        """Eval forward of every block on raw input x; returns the list of block outputs."""
        h, outs = self.quantize_input(x), []
        for b in self.blocks:
            h = b.forward(h, train=False)
            outs.append(h)
        return outs


def fake_quant_model(model, im, *, per_channel=False) -> FakeQuantModel:
    """The fake-quantised twin of ``model`` (Sequential of blocks) with the formats of ``im``
    (``compile_integer(model, ..., per_channel=per_channel)``; width and rounding are im's)."""
    fq = FakeQuantModel(list(model), im.input_fmt.width, im.input_fmt.rounding, per_channel)
    fq.set_formats(im)
    return fq


def quantized_loss(im, x, y, batch=2000) -> tuple:
    """(mean cross-entropy, accuracy) of the integer model's dequantised logits on (x, y)."""
    losses, correct = [], 0
    for i in range(0, len(x), batch):
        logits = im.infer(x[i:i + batch])
        losses.append(softmax_cross_entropy(logits, y[i:i + batch])[0] * len(logits))
        correct += int(np.sum(np.argmax(logits, 1) == y[i:i + batch]))
    return float(np.sum(losses) / len(x)), correct / len(x)
