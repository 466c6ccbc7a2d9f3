"""The integer model of an export as a QONNX graph: ONNX + QONNX's ``Quant`` nodes (docs/qonnx.md).

Usage::

    write_qonnx("model.h5", "model.onnx")     # or an ExportedModel from exporters.hdf5.export / read

Every integer tensor is a float32 tensor holding ``code * 2^-frac`` exactly, and a ``Quant`` node
(domain ``qonnx.custom_op.general``; scale ``2^-frac``, zero point 0, bit width, ``signed``,
``narrow`` 0, ``rounding_mode``) sits wherever bll_ref converts a value to a format.  QONNX's
``Quant`` clips ``x / scale`` to the integer range, then rounds (``int_quant`` in qonnx 1.0), which
for an integer range is bll_ref's round-then-saturate.  Rounding: ``floor`` -> ``FLOOR``,
``nearest_even`` -> ``ROUND`` (``np.round``, half to even); ``nearest`` (half toward +inf) has no
``Quant`` mode (``HALF_UP`` rounds half away from zero), so it is written as ``floor(v + 1/2)``:
``FLOOR`` after an ``Add`` node (``<layer>_round_half_up``) of half an output step.  ``Quant``
always saturates: a format that wraps is refused.

The graph computes in float32 (qonnx's executor returns float32 from every ``Quant``), so each
record is written only when float32 holds every value exactly: every partial sum of an
accumulator below ``2^24`` in its last place (bounded by ``max|x| * sum|W| + |c|`` per output),
LeakyReLU products within 24 bits, the float mean of an average pool within ``1/(16 k)`` code
steps of the exact one (never across a rounding breakpoint).  Otherwise a ValueError names the
record.  The C-order NCHW layout of the records is kept (ONNX's own).
"""
from __future__ import annotations

import json
import os

import numpy as np

try:                    # an optional dependency (the [test] extra): the rest of exporters works without it
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:     # pragma: no cover - said by _need_onnx
    onnx = None

from bll_ref.fileio import atomic_path
from bll_ref.fixedpoint import records as R

from .hdf5 import read
from .hls4ml_tb import hls4ml_names

__all__ = ["to_qonnx", "write_qonnx", "QUANT_DOMAIN", "QUANT_ROUNDING", "LUT_MODES"]

QUANT_DOMAIN = "qonnx.custom_op.general"
QUANT_ROUNDING = {"floor": "FLOOR", "nearest_even": "ROUND", "nearest": "FLOOR"}   # nearest: + half first
LUT_MODES = ("table", "function")
_EXACT = 1 << 24          # float32 holds every integer of magnitude up to 2^24
_OPSET = 13


def _need_onnx():
    if onnx is None:
        raise ValueError("QONNX export needs the onnx package; install it with pip install onnx qonnx "
                         "(or pip install -e '.[test]')")


def _bits(v) -> int:
    return int(v).bit_length()


class _Graph:
    """Nodes, initializers and value infos of one ONNX graph, all float32 with a fixed batch."""

    def __init__(self, batch):
        self.batch, self.nodes, self.inits, self.infos, self.names = batch, [], [], [], set()

    def tensor(self, name, shape, elem=None, batch=True):
        """Declare a tensor (value_info) of per-sample ``shape`` (of ``shape`` itself: ``batch=False``)."""
        if name in self.names:
            raise ValueError(f"QONNX export: tensor name {name!r} used twice")
        self.names.add(name)
        full = [self.batch, *shape] if batch else list(shape)
        self.infos.append(helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, full))
        return name

    def const(self, name, a, elem=np.float32):
        """An initializer; declared as a value too, so that qonnx's node-by-node executor feeds it."""
        a = np.asarray(a, dtype=elem)
        if name in self.names:
            raise ValueError(f"QONNX export: tensor name {name!r} used twice")
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(a, name))
        self.infos.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
        return name

    def node(self, op, inputs, output, name, shape, *, domain=None, elem=None, batch=True, **attrs):
        self.tensor(output, shape, elem, batch)
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, domain=domain, **attrs))
        return output

    def quant(self, name, x, out, fmt, shape):
        """A Quant node to ``fmt``: clip(x / 2^-frac) to the width's range, rounded, times 2^-frac."""
        ins = [x, self.const(f"{name}_scale", np.float32(2.0 ** -fmt.frac)), self.const(f"{name}_zeropt", np.float32(0)),
               self.const(f"{name}_bitwidth", np.float32(fmt.width))]
        return self.node("Quant", ins, out, name, shape, domain=QUANT_DOMAIN, signed=int(fmt.signed), narrow=0,
                         rounding_mode=QUANT_ROUNDING[fmt.rounding])

    def const_quant(self, name, codes, frac, bits=None):
        """Constant signed integer codes (weights, bias) as their exact values through a Quant of ``bits``
        (default: the narrowest width holding them); ``frac`` an int or an array broadcasting to
        ``codes`` (per-channel scales).  The values are on the grid: the Quant changes nothing."""
        codes, frac = np.asarray(codes, np.int64), np.asarray(frac, np.int64)
        lo, hi = int(codes.min(initial=0)), int(codes.max(initial=0))
        bits = max(_bits(-lo - 1) if lo < 0 else 0, _bits(hi), 1) + 1 if bits is None else bits
        val = self.const(f"{name}_float", np.ldexp(codes.astype(np.float64), -np.broadcast_to(frac, codes.shape)))
        ins = [val, self.const(f"{name}_scale", np.ldexp(np.ones(frac.shape), -frac)),
               self.const(f"{name}_zeropt", np.float32(0)), self.const(f"{name}_bitwidth", np.float32(bits))]
        return self.node("Quant", ins, f"{name}_q", f"{name}_quant", list(codes.shape), domain=QUANT_DOMAIN,
                         signed=1, narrow=0, rounding_mode="ROUND", batch=False)


def _refuse(i, rec, why):
    raise ValueError(f"QONNX cannot express record {i} ({rec.kind} {rec.name!r}) exactly: {why}")


def _check_saturates(i, rec):
    if rec.out_fmt.overflow == "wrap":
        _refuse(i, rec, "its format wraps on overflow and QONNX's Quant saturates; export with --overflow saturate")


def _half(fmt, frac):
    """The half output step added before a FLOOR Quant to round ``nearest`` (half up), in units of
    2^-frac of a value on that grid; 0 when no rounding happens (frac <= fmt.frac) or another mode."""
    return 1 << (frac - fmt.frac - 1) if fmt.rounding == "nearest" and frac > fmt.frac else 0


def _half_add(g, name, x, fmt, frac, shape):
    """``x + 2^-(fmt.frac + 1)`` when rounding ``nearest`` needs it (an Add node), else ``x``."""
    h = _half(fmt, frac)
    if not h:
        return x
    return g.node("Add", [x, g.const(f"{name}_half", np.float32(np.ldexp(h, -frac)))], f"{name}_plus_half",
                  f"{name}_round_half_up", shape)


def _affine(g, i, rec, x, in_fmt, name, shape):
    """Dense / Conv2d / Scale: Quant(x W + c) with the bias (+ half a step for nearest) at acc frac."""
    _check_saturates(i, rec)
    W, c = rec.W.astype(np.int64), rec.c.astype(np.int64)
    fr = rec.channel_acc_fracs()                                    # (out,) accumulator frac per channel
    half = np.array([_half(rec.out_fmt, int(f)) for f in fr], np.int64)
    wf = fr - in_fmt.frac                                           # per-channel weight frac
    if isinstance(rec, R.Dense):
        absw, wshape = np.abs(W).sum(0), (1, -1)
    elif isinstance(rec, R.Conv2d):
        absw, wshape = np.abs(W).reshape(W.shape[0], -1).sum(1), (-1, 1, 1, 1)
    else:
        absw, wshape = np.abs(W), (-1,) + (1,) * (len(shape) - 1)       # (C, 1, 1) for images
    bound = in_fmt.max_abs_code * absw + np.abs(c) + half
    if bound.max(initial=0) >= _EXACT:
        _refuse(i, rec, f"a partial sum can reach {int(bound.max())} in its last place, beyond float32's exact "
                "2^24; use fewer bits")
    per_channel = rec.w_frac is not None
    if isinstance(rec, R.Scale):                                    # per-channel multipliers broadcast over x
        W, c = W.reshape(wshape), c.reshape(wshape)
    wfr, bfr = (wf.reshape(wshape), fr.reshape(c.shape)) if per_channel else (int(wf[0]), int(fr[0]))
    if isinstance(rec, R.Scale):
        # plain initializers (exact values): qonnx's channels-last conversion moves its transposes only
        # past a Mul / Add whose other operand is an initializer
        Wq = g.const(f"{name}_W", np.ldexp(W.astype(np.float64), -np.broadcast_to(wfr, W.shape)))
        bq = g.const(f"{name}_b", np.ldexp(c.astype(np.float64), -np.broadcast_to(bfr, c.shape)))
    else:
        Wq = g.const_quant(f"{name}_W", W, wfr, rec.w_fmt.width)
        bq = g.const_quant(f"{name}_b", c, bfr)
    if isinstance(rec, R.Dense):
        acc = g.node("MatMul", [x, Wq], f"{name}_matmul", name, shape)
        acc = g.node("Add", [acc, bq], f"{name}_acc", f"{name}_bias", shape)
    elif isinstance(rec, R.Conv2d):
        (ph, pw), (sh, sw) = rec.padding, rec.stride
        acc = g.node("Conv", [x, Wq, bq], f"{name}_acc", name, shape, kernel_shape=list(W.shape[2:]),
                     pads=[ph, pw, ph, pw], strides=[sh, sw], dilations=[1, 1], group=1)
    else:
        acc = g.node("Mul", [x, Wq], f"{name}_mul", name, shape)
        acc = g.node("Add", [acc, bq], f"{name}_acc", f"{name}_bias", shape)
    if half.any():      # nearest: + half an output step (per channel when the channels' fracs differ)
        h = np.ldexp(half.astype(np.float64), -fr)
        h = g.const(f"{name}_half", h.reshape((-1,) + (1,) * (len(shape) - 1)) if per_channel else h[0])
        acc = g.node("Add", [acc, h], f"{name}_plus_half", f"{name}_round_half_up", shape)
    return g.quant(f"{name}_quant", acc, f"{name}_out", rec.out_fmt, shape)


def _record(g, i, rec, ins, in_fmts, name, shape, luts):
    """Append record ``i``'s nodes; returns its output tensor's name."""
    f = rec.out_fmt
    if isinstance(rec, R.Affine):
        return _affine(g, i, rec, ins[0], in_fmts[0], name, shape)
    if isinstance(rec, R.ReLU):
        return g.node("Relu", ins, f"{name}_out", name, shape)
    if isinstance(rec, R.MaxPool2d):
        return g.node("MaxPool", ins, f"{name}_out", name, shape, kernel_shape=list(rec.kernel_size),
                      strides=list(rec.stride), pads=[0, 0, 0, 0])
    if isinstance(rec, R.Flatten):
        return g.node("Flatten", ins, f"{name}_out", name, shape, axis=1)
    if isinstance(rec, R.LeakyReLU):
        pf = f.frac + rec.slope_frac                                 # the products' grid
        if f.max_abs_code * abs(rec.slope_code) + _half(f, pf) >= _EXACT:
            _refuse(i, rec, f"x * slope needs {_bits(f.max_abs_code * abs(rec.slope_code))} bits, beyond float32's 24")
        if abs(rec.slope_code) > 1 << rec.slope_frac:
            _check_saturates(i, rec)
        y = g.node("LeakyRelu", ins, f"{name}_leaky", name, shape, alpha=float(np.ldexp(rec.slope_code, -rec.slope_frac)))
        return g.quant(f"{name}_quant", _half_add(g, name, y, f, pf, shape), f"{name}_out", f, shape)
    if isinstance(rec, R.AvgPool2d):
        k = rec.kernel_size[0] * rec.kernel_size[1]
        # a mean s/k that is not a rounding breakpoint lies >= 1/(2k) code steps from one; float32's
        # sum, division and half-step add stay within 4 ulps = 2^(b-21) steps (b: bits of max|code|)
        if 16 * k * f.max_abs_code >= 1 << 21:
            _refuse(i, rec, f"float32's mean of {k} values of {f.width} bits can cross a rounding breakpoint; "
                    "use fewer bits or a smaller window")
        y = g.node("AveragePool", ins, f"{name}_avg", name, shape, kernel_shape=list(rec.kernel_size),
                   strides=list(rec.stride), pads=[0, 0, 0, 0])
        return g.quant(f"{name}_quant", _half_add(g, name, y, f, f.frac + 8, shape), f"{name}_out", f, shape)
    if isinstance(rec, R.Add):
        _check_saturates(i, rec)
        fa, fb = in_fmts[0].frac, in_fmts[1].frac
        top = max(fa, fb)
        if (in_fmts[0].max_abs_code << (top - fa)) + (in_fmts[1].max_abs_code << (top - fb)) + _half(f, top) >= _EXACT:
            _refuse(i, rec, "the exact sum of its operands needs more than float32's 24 bits")
        y = g.node("Add", ins, f"{name}_sum", name, shape)
        return g.quant(f"{name}_quant", _half_add(g, name, y, f, top, shape), f"{name}_out", f, shape)
    if isinstance(rec, R.Lut):
        if luts == "function" and rec.function in ("sigmoid", "tanh"):
            y = g.node(rec.function.capitalize(), ins, f"{name}_fn", name, shape)
            return g.quant(f"{name}_quant", _half_add(g, name, y, f, f.frac + 8, shape), f"{name}_out", f, shape)
        # the table itself: index = x * 2^F_in - index_offset (exact small integers), then Gather
        v = g.node("Mul", [ins[0], g.const(f"{name}_inv_step", np.float32(2.0 ** in_fmts[0].frac))],
                   f"{name}_code", f"{name}_to_code", shape)
        v = g.node("Add", [v, g.const(f"{name}_offset", np.float32(-rec.index_offset))], f"{name}_index_f",
                   f"{name}_offset_add", shape)
        v = g.node("Cast", [v], f"{name}_index", f"{name}_cast", shape, elem=TensorProto.INT64, to=TensorProto.INT64)
        t = g.const(f"{name}_table", np.ldexp(rec.table.astype(np.float64), -f.frac))
        return g.node("Gather", [t, v], f"{name}_out", name, shape, axis=0)
    _refuse(i, rec, f"no QONNX mapping for kind {rec.kind!r}")


def to_qonnx(exported, *, batch=1, luts="table"):
    """The integer model of an export as a QONNX ``onnx.ModelProto``.

    Parameters
    ----------
    exported : ExportedModel (``exporters.hdf5.export`` / ``read``) or the path of an export file
    batch : int, the fixed batch dimension of every tensor (qonnx's executor and hls4ml want fixed shapes)
    luts : "table" writes sigmoid / tanh records as their exact tables (Mul, Add, Cast, Gather: standard
        ONNX, bit-exact); "function" as ONNX Sigmoid / Tanh + Quant, which hls4ml's ONNX frontend reads
        but whose float32 function may differ from the table near a rounding breakpoint

    Returns
    -------
    onnx.ModelProto; graph input ``x`` (batch, *input shape) float32, output the last record's values.
    ``metadata_props["bll_ref_records"]`` of the model and of its graph (JSON) lists each record's index, kind, name, hls4ml name,
    output tensor and frac.  ValueError (one line, naming the record) for what QONNX cannot express.
    """
    _need_onnx()
    if luts not in LUT_MODES:
        raise ValueError(f"to_qonnx: luts must be one of {LUT_MODES}, got {luts!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"to_qonnx: batch must be a positive integer, got {batch!r}")
    if isinstance(exported, (str, os.PathLike)):
        exported = read(exported)
    recs, traces = exported.records, exported.traces
    names = hls4ml_names(recs)
    g = _Graph(int(batch))
    x_shape = list(traces[0].shape[1:])
    graph_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [int(batch), *x_shape])
    g.names.add("x")
    _check_saturates(0, recs[0])
    f0 = recs[0].out_fmt
    # the input: floor / nearest_even directly; nearest as FLOOR after adding half a step, exact when
    # float32 holds x + 2^-(F+1) (e.g. any x on the grid 2^-(F+1); docs/qonnx.md)
    x = _half_add(g, "x", "x", f0, f0.frac + 24, x_shape) if f0.rounding == "nearest" else "x"
    outs, meta = [g.quant("x_quant", x, "x_q", f0, x_shape)], [(0, recs[0], "x", "x_q")]
    for i, rec in enumerate(recs[1:], 1):
        shape = list(traces[i].shape[1:])
        out = _record(g, i, rec, [outs[j] for j in rec.inputs], [recs[j].out_fmt for j in rec.inputs],
                      names[rec.name], shape, luts)
        outs.append(out)
        meta.append((i, rec, names[rec.name], out))
    last = outs[-1]
    info = next(v for v in g.infos if v.name == last)
    g.infos.remove(info)
    graph = helper.make_graph(g.nodes, "bll_ref_integer_model", [graph_in], [info], initializer=g.inits,
                              value_info=g.infos)
    model = helper.make_model(graph, producer_name="bll_ref", opset_imports=[
        helper.make_opsetid("", _OPSET), helper.make_opsetid(QUANT_DOMAIN, 1)])
    model.ir_version = 8
    props = {"bll_ref_records": json.dumps(
        [{"index": i, "kind": r.kind, "name": r.name, "hls4ml_name": n, "tensor": t, "frac": r.out_fmt.frac}
         for i, r, n, t in meta])}
    helper.set_model_props(model, props)                # ONNX's place, and the graph's, where qonnx's
    helper.set_metadata_props(model.graph, props)       # ModelWrapper.get_metadata_prop looks
    return model


def write_qonnx(exported, path, *, batch=1, luts="table") -> str:
    """Write :func:`to_qonnx`'s model to ``path`` (atomically: nothing is written on an error) after
    ``onnx.checker.check_model`` accepts it.  Returns the path."""
    model = to_qonnx(exported, batch=batch, luts=luts)
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)
    return str(path)
