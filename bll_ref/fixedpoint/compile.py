"""The compiler: float model -> layer records -> :class:`~bll_ref.fixedpoint.IntegerModel`."""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import layers as L
from . import intops
from . import records as R
from .model import IntegerModel
from .calibrate import (_finite_array, calibrate_activation, calibrate_activation_mse, calibrate_weight,
                        calibrate_weight_per_channel)
from .qformat import CALIBRATIONS, QFormat, _check_fmt, _quantize_int64, dequantize, quantize
from .walk import Affine, ChannelAffine, Junction, Op, walk

__all__ = ["compile_integer"]


def _hp(layer, key, default=None):
    hp = layer.hyperparameters() if hasattr(layer, "hyperparameters") else {}
    return hp[key] if key in hp else getattr(layer, key, default)


def _avg_reciprocal(k):
    """recip = round(2**30 / k) (half up, integer arithmetic): the avgpool2d attributes that format
    readers before issue 24 multiply by.  The record divides exactly and does not use them."""
    return ((1 << 31) // k + 1) // 2, 30


class _Compiler:
    """Follows the model walk once, computing float64 activations of the (BN-folded) graph on the
    calibration batch to calibrate each record's output format."""

    def __init__(self, width, rounding, overflow, percentile, calibration="percentile", per_channel=False,
                 unsigned=frozenset(), unsigned_lut=False, out_formats=None):
        self.width, self.rounding, self.overflow, self.percentile = width, rounding, overflow, percentile
        self.calibration, self.per_channel, self.unsigned = calibration, per_channel, unsigned
        self.unsigned_lut = unsigned_lut
        self.out_formats = {k: QFormat.from_dict(v) for k, v in (out_formats or {}).items()}
        self.records, self.acts = [], []

    def calibrate(self, y, signed=True):
        """Output format of a tensor whose float64 calibration values are ``y``."""
        if not signed:
            y = np.maximum(y, 0.0)               # the format feeds a ReLU: negatives become 0
        if self.calibration == "mse":
            return calibrate_activation_mse(y, self.width, signed=signed, rounding=self.rounding,
                                            overflow=self.overflow)
        return calibrate_activation(y, self.width, self.percentile, signed=signed, rounding=self.rounding,
                                    overflow=self.overflow)

    def emit(self, cls, name, inputs, y, out_fmt=None, **fields):
        if out_fmt is None and name in self.out_formats:
            out_fmt = self.out_formats[name]
        if out_fmt is None:
            out_fmt = self.calibrate(y, signed=len(self.records) not in self.unsigned)
        head = name.split(".")[0].split("+")[0]
        self.records.append(cls(name=name, block=int(head) if head.isdigit() else -1, inputs=tuple(inputs),
                                out_fmt=out_fmt, **fields))
        self.acts.append(y)

    def step(self, st):
        """One step of the walk -> one record."""
        if isinstance(st, Affine):
            return self.affine(st)
        if isinstance(st, ChannelAffine):
            return self.scale(st)
        name, (idx, *rest), layer = st.name, st.inputs, st.layer
        x, in_fmt = self.acts[idx], self.records[idx].out_fmt
        if isinstance(st, Junction):
            body, sc = self.acts[idx], self.acts[rest[0]]
            if body.shape != sc.shape:
                raise ValueError(f"Residual {name}: body {body.shape} and shortcut {sc.shape} outputs differ")
            return self.emit(R.Add, name, st.inputs, body + sc)
        if isinstance(layer, L.ReLU):
            return self.emit(R.ReLU, name, [idx], np.maximum(x, 0.0), out_fmt=in_fmt)
        if isinstance(layer, L.LeakyReLU):
            slope = float(layer.slope)
            sf = calibrate_weight(np.array([slope]), 16, rounding=self.rounding)
            return self.emit(R.LeakyReLU, name, [idx], np.where(x > 0, x, slope * x), out_fmt=in_fmt,
                             slope=slope, slope_code=int(quantize(slope, sf)), slope_frac=sf.frac)
        if isinstance(layer, (L.Sigmoid, L.Tanh)):
            return self.lut(name, layer, idx)
        if isinstance(layer, L.Flatten):
            return self.emit(R.Flatten, name, [idx], x.reshape(x.shape[0], -1), out_fmt=in_fmt)
        if isinstance(layer, (L.MaxPool2d, L.AvgPool2d)):
            return self.pool(name, layer, idx)
        raise ValueError(f"compile_integer: layer {name} ({type(layer).__name__}) has no integer "
                         "implementation; supported: Dense, Conv2d, BatchNorm, ReLU, LeakyReLU, "
                         "Sigmoid, Tanh, Flatten, MaxPool2d, AvgPool2d, Residual, Sequential")

    def pool(self, name, layer, idx):
        x, in_fmt = self.acts[idx], self.records[idx].out_fmt
        k = intops.pair(_hp(layer, "kernel_size"))
        s = _hp(layer, "stride")
        s = k if s is None else intops.pair(s)
        if intops.pair(_hp(layer, "padding", 0) or 0) != (0, 0):
            raise ValueError(f"{name}: padded pooling has no integer implementation")
        win = intops.windows(x, k, s)
        if isinstance(layer, L.MaxPool2d):
            return self.emit(R.MaxPool2d, name, [idx], win.max(axis=(-2, -1)), out_fmt=in_fmt, kernel_size=k, stride=s)
        recip, rshift = _avg_reciprocal(k[0] * k[1])
        return self.emit(R.AvgPool2d, name, [idx], win.mean(axis=(-2, -1)), out_fmt=in_fmt, kernel_size=k,
                         stride=s, recip=recip, recip_shift=rshift)

    def quantize_affine(self, name, W, c, in_fmt, who, out_axis):
        """Weight codes and the bias aligned to the accumulator: (w_fmt, acc_frac, Wq, cq, w_frac);
        w_frac is None for one per-tensor format, else the (out,) per-channel fracs."""
        if not self.per_channel:
            w_fmt = calibrate_weight(W, self.width, rounding=self.rounding, overflow=self.overflow)
            acc_frac = in_fmt.frac + w_fmt.frac
            return w_fmt, acc_frac, quantize(W, w_fmt), _quantize_int64(c, acc_frac, self.rounding, who), None
        w_fmt, w_frac = calibrate_weight_per_channel(W, self.width, out_axis, rounding=self.rounding,
                                                     overflow=self.overflow)
        shape = [1] * W.ndim
        shape[out_axis] = -1
        # per channel o: codes round(W[o] * 2**w_frac[o]); exact power-of-two scaling as in quantize
        Wq = quantize(np.ldexp(W, (w_frac - w_fmt.frac).reshape(shape)), w_fmt)
        acc_fracs = in_fmt.frac + w_frac
        cq = np.array([_quantize_int64(ci, int(f), self.rounding, who) for ci, f in zip(c, acc_fracs)],
                      dtype=np.int64).reshape(-1)
        return w_fmt, in_fmt.frac + w_fmt.frac, Wq, cq, w_frac

    def affine(self, st):
        name, idx, layer, W, c = st.name, st.inputs[0], st.layer, st.W, st.c
        x, in_fmt = self.acts[idx], self.records[idx].out_fmt
        w_fmt, acc_frac, Wq, cq, w_frac = self.quantize_affine(name, W, c, in_fmt, f"compile_integer {name} bias",
                                                               1 if isinstance(layer, L.Dense) else 0)
        if isinstance(layer, L.Dense):
            cls, conv, y = R.Dense, {}, x @ W + c
            k = W.shape[0]
        else:
            cls = R.Conv2d
            conv = {"stride": intops.pair(_hp(layer, "stride", 1)), "padding": intops.pair(_hp(layer, "padding", 0))}
            y = intops.conv2d(x, W, conv["stride"], conv["padding"], np.matmul) + c.reshape(1, -1, 1, 1)
            k = int(np.prod(W.shape[1:]))
        bound = k * (1 << in_fmt.width) * (1 << (w_fmt.width - 1)) + int(np.abs(cq).max(initial=0))
        if bound >= 2 ** 62:
            raise ValueError(f"compile_integer {name}: accumulator could reach {bound} and overflow "
                             "int64; use a smaller width")
        return self.emit(cls, name, [idx], y, w_fmt=w_fmt, acc_frac=acc_frac, W=Wq, c=cq, w_frac=w_frac,
                         info={"W_float": W, "c_float": c}, **conv)

    def scale(self, st):
        name, idx, s, t = st.name, st.inputs[0], st.s, st.t
        x, in_fmt = self.acts[idx], self.records[idx].out_fmt
        w_fmt, acc_frac, Wq, cq, w_frac = self.quantize_affine(name, s, t, in_fmt, f"{name} shift", 0)
        shp = intops.channel_shape(x.ndim)
        return self.emit(R.Scale, name, [idx], x * s.reshape(shp) + t.reshape(shp), w_fmt=w_fmt,
                         acc_frac=acc_frac, W=Wq, c=cq, w_frac=w_frac, info={"W_float": s, "c_float": t})

    def lut(self, name, layer, idx):
        x, in_fmt = self.acts[idx], self.records[idx].out_fmt
        if in_fmt.width > 16:
            raise ValueError(f"{name}: lookup tables need an input width <= 16, got {in_fmt.width}")
        f = np.tanh if isinstance(layer, L.Tanh) else L.sigmoid
        # tanh: signed, frac = width - 1 (values in (-1, 1)); sigmoid: values in (0, 1), unsigned
        # frac = width uses every code (2**width - 1 stands for 1 - 2**-width; 1.0 saturates to it)
        signed = f is np.tanh or not self.unsigned_lut
        out_fmt = QFormat(self.width, self.width - 1 if signed else self.width, signed, self.rounding, self.overflow)
        table_fmt = QFormat(out_fmt.width, out_fmt.frac, signed, self.rounding, "saturate")
        grid = dequantize(np.arange(in_fmt.min_code, in_fmt.max_code + 1), in_fmt)
        return self.emit(R.Lut, name, [idx], f(x), out_fmt=out_fmt, function="tanh" if f is np.tanh else "sigmoid",
                         index_offset=in_fmt.min_code, table=quantize(f(grid), table_fmt))


def _unsigned_records(model) -> frozenset:
    """Indices of the records whose output a ReLU makes non-negative: a Dense / Conv2d / scale /
    add record whose only consumer is a ReLU, or a MaxPool2d / Flatten (which commute with ReLU)
    whose only consumer is, and so on.  Such a record gets an unsigned format (its negative values
    saturate to 0, which the ReLU would have made of them) and the ops after it inherit it."""
    try:
        steps = list(walk(model))
    except ValueError:
        return frozenset()                   # the compile pass raises it, in walk order
    consumers = {}
    for s, st in enumerate(steps):
        for j in st.inputs:
            consumers.setdefault(j, []).append(s + 1)

    def reaches_relu(i):
        while True:
            users = consumers.get(i, [])
            if len(users) != 1 or not isinstance(steps[users[0] - 1], Op):
                return False
            layer = steps[users[0] - 1].layer
            if isinstance(layer, L.ReLU):
                return True
            if not isinstance(layer, (L.MaxPool2d, L.Flatten)):
                return False
            i = users[0]

    return frozenset(s + 1 for s, st in enumerate(steps)
                     if isinstance(st, (Affine, ChannelAffine, Junction)) and reaches_relu(s + 1))


def _widen_output(comp, output_width):
    """Recalibrate the last record's out_fmt at ``output_width`` bits (nothing reads it)."""
    last = comp.records[-1]
    if not 2 <= output_width <= 16:
        raise ValueError(f"compile_integer: output_width must be in 2..16, got {output_width}")
    if not isinstance(last, (R.Affine, R.Add)):
        raise ValueError(f"compile_integer: output_width needs a model that ends in Dense / Conv2d / "
                         f"BatchNorm / Residual, not in {last.kind} {last.name!r}")
    if last.name in comp.out_formats:
        return
    width, comp.width = comp.width, output_width
    try:
        fmt = comp.calibrate(comp.acts[-1])
    finally:
        comp.width = width
    comp.records[-1] = dataclasses.replace(last, out_fmt=fmt)


def compile_integer(model, calibration_x, *, width=8, rounding="nearest", overflow="saturate",
                    percentile=100.0, input_fmt=None, check=True, calibration="percentile",
                    per_channel=False, unsigned=True, out_formats=None, output_width=None) -> IntegerModel:
    """Compile a float model into integer-only reference inference.

    Follows the model walk (:func:`bll_ref.fixedpoint.walk.walk`: nested Sequentials flattened,
    a ``Residual`` becomes its body and shortcut paths plus an ``add`` record, each BatchNorm
    folded into the Dense / Conv2d right before it, a BatchNorm elsewhere a per-channel
    ``scale``), quantises weights per tensor (:func:`calibrate_weight`; per output channel with
    ``per_channel``) and each record's output from the float64 activations of ``calibration_x``
    (:func:`calibrate_activation` with ``percentile``, or :func:`calibrate_activation_mse`).

    Formats use every bit (``unsigned=True``): a tensor that cannot be negative gets an unsigned
    format: the output of a Dense / Conv2d / BatchNorm / add whose only consumer is a ReLU (through
    MaxPool2d / Flatten) and so the ReLU output (which keeps its input's format), the sigmoid table
    (frac = width), and the input
    when every calibration value is >= 0.  Only with ``overflow="saturate"`` for all but the
    sigmoid table: wrapping a negative value into an unsigned format would not make it 0.

    Integer semantics per record kind (x, y codes; all arithmetic int64):

    - dense / conv2d / scale: acc = x @ W_q (im2col for conv, per channel for scale) + c_q, where
      c_q is the bias at acc_frac = in_frac + w_frac; y = requantize(acc, acc_frac, out_fmt).
    - relu: y = max(x, 0).  leaky_relu: y = x if x > 0 else round_shift(x * slope_code,
      slope_frac) (slope as a 16-bit code), then overflow.  Both keep the input format.
    - maxpool2d: max of codes.  avgpool2d: y = div_round(sum, k), the window sum divided by the
      window size k = kh*kw exactly and rounded with the output rounding (= round_shift(sum,
      log2 k) for power-of-two windows).  Both keep the input format.
    - flatten: reshape.  add (Residual): both operands are aligned exactly to the larger frac by
      left shifts, added in int64, then requantised once to the calibrated out_fmt.
    - lut (Sigmoid / Tanh): y = table[x - min_code], a table of 2**in_width entries (in_width
      <= 16) with output format frac = width - 1 signed (tanh) or frac = width unsigned (sigmoid);
      entries saturated.
    - dense / conv2d / scale with ``per_channel``: w_frac[o] per output channel, channel o's bias
      and accumulator at in_frac + w_frac[o] fractional bits, requantised per channel.

    Parameters
    ----------
    model : Layer (usually Sequential of blocks), float weights, eval-mode BN statistics used
    calibration_x : ``(N, *input_shape)`` float array
    width : int, 2..16, bits of weights and activations
    rounding, overflow : QFormat modes used everywhere
    percentile : float in (0, 100], activation calibration (100 = no clipping)
    input_fmt : QFormat or None (None: calibrated from calibration_x)
    calibration : "percentile" (clip ``|x|`` at ``percentile``) or "mse" (the frac of least mean
        squared quantisation error on the calibration batch; ``percentile`` unused)
    per_channel : bool, one power-of-two weight format per output channel
    unsigned : bool, unsigned formats where a tensor cannot be negative (see above)
    out_formats : dict record name -> QFormat (or its dict) or None: output formats to use instead
        of calibrating (the formats ``bll_ref.quant_finetune`` trained for; "input" = the input
        format when ``input_fmt`` is None); records not named are calibrated
    output_width : int 2..16 or None (= width): width of the model's output (the last record, a
        dense / conv2d / scale / add), e.g. 16-bit logits after 4-bit layers, as hls4ml lets the
        last layer's result type differ; weights and every other activation keep ``width``
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
    if calibration not in CALIBRATIONS:
        raise ValueError(f"compile_integer: calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    comp = _Compiler(int(width), rounding, overflow, percentile, calibration, bool(per_channel),
                     _unsigned_records(model) if unsigned and overflow == "saturate" else frozenset(),
                     bool(unsigned), out_formats)
    QFormat(int(width), 0, True, rounding, overflow)   # validates the modes early
    if input_fmt is None and "input" in comp.out_formats:
        input_fmt = comp.out_formats["input"]
    if input_fmt is None:
        input_fmt = comp.calibrate(x, signed=not (unsigned and overflow == "saturate" and float(x.min()) >= 0.0))
    _check_fmt(input_fmt, "compile_integer input_fmt")
    comp.emit(R.Input, "input", [], x, out_fmt=input_fmt, shape=x.shape[1:])
    for st in walk(model):
        comp.step(st)
    if output_width is not None and int(output_width) != int(width):
        _widen_output(comp, int(output_width))
    unknown = sorted(set(comp.out_formats) - {r.name for r in comp.records})
    if unknown:
        raise ValueError(f"compile_integer: out_formats names {unknown[:4]}, which are no records of this model")
    if check:
        ref = np.asarray(model.forward(np.asarray(calibration_x), train=False), dtype=np.float64)
        twin = comp.acts[-1]
        scale = max(float(np.abs(ref).max()), 1e-12)
        if ref.shape != twin.shape or float(np.abs(ref - twin).max()) > 1e-3 * scale:
            raise RuntimeError("compile_integer: the compiler's float twin disagrees with "
                               "model.forward(x, train=False); a layer convention is not understood")
    return IntegerModel(comp.records)
