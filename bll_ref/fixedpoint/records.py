"""Layer records: the plain-data description of integer-only inference, one dataclass per kind.

A record validates itself when it is made (formats, integer arrays, codes inside their formats)
and runs itself in int64 arithmetic (:meth:`Record.run`); :class:`~bll_ref.fixedpoint.IntegerModel`
checks how the records link up (inputs, formats) and runs the list.  :attr:`Record.attrs` (JSON)
and :attr:`Record.arrays` are the plain data that exporters write; :func:`record_from_plain`
reads it back.  The integer semantics of each kind are in :func:`~bll_ref.fixedpoint.compile_integer`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from ..fileio import to_json
from .intops import channel_shape, conv2d_int, matmul_int, pair, windows
from .qformat import QFormat, div_round, overflow, requantize, round_shift

__all__ = ["Record", "Input", "Dense", "Conv2d", "Scale", "ReLU", "LeakyReLU", "MaxPool2d", "AvgPool2d",
           "Flatten", "Add", "Lut", "Affine", "RECORD_TYPES", "RECORD_KINDS", "record_from_plain"]


# ------------------------------------------------------------------------------------------------
# field kinds: how an attribute is checked on the way in and written on the way out
# ------------------------------------------------------------------------------------------------
def _int(v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float, np.floating)) \
            or not float(v).is_integer():
        raise ValueError(f"must be an integer, got {v!r}")
    return int(v)


def _ints(v):
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise ValueError(f"must be a list of integers, got {v!r}")
    return tuple(_int(d) for d in v)


def _opt(conv):
    return lambda v: None if v is None else conv(v)


_CONVERT = {"fmt": QFormat.from_dict, "int": _int, "pair": pair, "ints": _ints, "float?": _opt(float),
            "str?": _opt(str)}


def _attr(kind):
    """A record attribute (JSON); kinds ending in '?' are optional (None = absent)."""
    return field(default=None, metadata={"attr": kind}) if kind.endswith("?") else field(metadata={"attr": kind})


def _array(ndim, optional=False):
    """An integer array of ``ndim`` dimensions, required unless ``optional`` (None = absent)."""
    if optional:
        return field(default=None, metadata={"array": ndim, "optional": True})
    return field(metadata={"array": ndim})


def _plain(v):
    if isinstance(v, QFormat):
        return v.to_dict()
    return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False, kw_only=True)
class Record:
    """Common fields: ``name`` (path of the float layer(s), e.g. ``"1.0+1.1"`` for a Dense at
    block 1 with its BatchNorm folded in), ``inputs`` (indices of earlier records), ``out_fmt``
    (output QFormat), ``block`` (top-level block index, -1 for the input; None if unknown),
    ``info`` (informational arrays such as the float twins ``W_float``, never used by
    :meth:`run`) and ``extra`` (attributes of no known meaning, kept as read)."""

    kind: ClassVar[str]
    n_inputs: ClassVar[int] = 1
    name: str
    inputs: tuple
    out_fmt: QFormat
    block: int | None = None
    info: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"attribute 'name' must be a string, got {self.name!r}")
        if (not isinstance(self.inputs, (list, tuple)) or len(self.inputs) != self.n_inputs
                or any(isinstance(j, bool) or not isinstance(j, (int, np.integer)) for j in self.inputs)):
            raise ValueError(f"'inputs' must list {self.n_inputs} indices of earlier records, got {self.inputs!r}")
        self.inputs = tuple(int(j) for j in self.inputs)
        self.out_fmt = QFormat.from_dict(self.out_fmt)
        self.block = _opt(_int)(self.block)
        for f in dataclasses.fields(self):
            if "attr" in f.metadata:
                try:
                    setattr(self, f.name, _CONVERT[f.metadata["attr"]](getattr(self, f.name)))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"attribute {f.name!r}: {err}") from None
            elif "array" in f.metadata:
                if f.metadata.get("optional") and getattr(self, f.name) is None:
                    continue
                a = np.array(getattr(self, f.name))    # copy: never alias a caller's / file's buffer
                if a.ndim != f.metadata["array"] or not np.issubdtype(a.dtype, np.integer):
                    raise ValueError(f"array {f.name!r} must be a {f.metadata['array']}-d integer array, "
                                     f"got {a.shape} {a.dtype}")
                setattr(self, f.name, a)
        self.info = {k: np.array(v) for k, v in self.info.items()}
        self.extra = json.loads(to_json(self.extra))   # a JSON-able private copy
        self._check()

    def _check(self):
        """Checks between this record's own fields."""

    def link(self, in_fmts):
        """Checks against the output formats of the input records (raises ValueError)."""

    def run(self, xs, in_fmts) -> np.ndarray:
        """int64 input codes (one array per input) -> output codes of ``out_fmt.code_dtype``."""
        raise NotImplementedError

    @property
    def attrs(self) -> dict:
        """The JSON-able attributes: kind, name, block, inputs, out_fmt and the kind's own."""
        a = {"kind": self.kind, "name": self.name, **({} if self.block is None else {"block": self.block}),
             "inputs": list(self.inputs), "out_fmt": self.out_fmt.to_dict()}
        for f in dataclasses.fields(self):
            if "attr" in f.metadata and getattr(self, f.name) is not None:
                a[f.name] = _plain(getattr(self, f.name))
        return {**a, **self.extra}

    @property
    def arrays(self) -> dict:
        """The record's arrays: its integer arrays, then the informational ones."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if "array" in f.metadata and getattr(self, f.name) is not None},
                **self.info}

    def __getitem__(self, key):
        """``rec["attrs"]`` / ``rec["arrays"]``: the plain-data view of the dict records of old."""
        if key not in ("attrs", "arrays"):
            raise KeyError(key)
        return getattr(self, key)


@dataclass(eq=False, kw_only=True)
class Input(Record):
    """Record 0: the input codes, per-sample ``shape``."""
    kind = "input"
    n_inputs = 0
    shape: tuple = _attr("ints")


@dataclass(eq=False, kw_only=True)
class Affine(Record):
    """acc = x W + c in int64 with ``c`` at acc_frac = in_frac + w_frac fractional bits, then
    y = requantize(acc, acc_frac, out_fmt).  Dense, Conv2d and Scale differ in how x meets W.

    Per-channel weight formats (optional array ``w_frac``, one per output channel): the weight
    codes of channel o have ``w_frac[o]`` fractional bits, ``w_fmt.frac == min(w_frac)``, and
    channel o's bias ``c[o]`` and accumulator have ``acc_frac + w_frac[o] - w_fmt.frac`` =
    in_frac + w_frac[o] fractional bits; y[o] = requantize(acc[o], in_frac + w_frac[o], out_fmt)."""
    _out_axis: ClassVar[int] = 0
    w_fmt: QFormat = _attr("fmt")
    acc_frac: int = _attr("int")
    W: np.ndarray = _array(2)
    c: np.ndarray = _array(1)
    w_frac: np.ndarray | None = _array(1, optional=True)

    def _check(self):
        n_out = self.W.shape[self._out_axis]
        if self.c.shape != (n_out,):
            raise ValueError(f"bias c must have shape ({n_out},), got {self.c.shape}")
        if self.W.size and (self.W.min() < self.w_fmt.min_code or self.W.max() > self.w_fmt.max_code):
            raise ValueError(f"weight codes outside {self.w_fmt.hls_type}")
        self.W, self.c = self.W.astype(self.w_fmt.code_dtype), self.c.astype(np.int64)
        if self.w_frac is not None:
            wf = self.w_frac
            if wf.shape != (n_out,) or wf.min() < -64 or wf.max() > 64:
                raise ValueError(f"per-channel w_frac must be ({n_out},) integers in -64..64, got {wf.shape} "
                                 f"in {wf.min()}..{wf.max()}")
            if int(wf.min()) != self.w_fmt.frac:
                raise ValueError(f"w_fmt.frac {self.w_fmt.frac} must equal min(w_frac) = {int(wf.min())}")
            self.w_frac = wf.astype(np.int64)

    def link(self, in_fmts):
        if self.acc_frac != in_fmts[0].frac + self.w_fmt.frac:
            raise ValueError(f"acc_frac {self.acc_frac} != input frac {in_fmts[0].frac} + weight frac "
                             f"{self.w_fmt.frac}")

    def channel_acc_fracs(self) -> np.ndarray:
        """(n_out,) fractional bits of each output channel's accumulator and bias."""
        n_out = self.W.shape[self._out_axis]
        if self.w_frac is None:
            return np.full(n_out, self.acc_frac, dtype=np.int64)
        return self.acc_frac + self.w_frac - self.w_fmt.frac

    def requantize_channels(self, acc, axis):
        """requantize ``acc`` (int64, channels along ``axis``) with each channel's acc frac."""
        if self.w_frac is None:
            return requantize(acc, self.acc_frac, self.out_fmt)
        fr = self.channel_acc_fracs()
        y = np.empty(acc.shape, dtype=self.out_fmt.code_dtype)
        for f in np.unique(fr):                  # one requantize per distinct shift
            sel = [slice(None)] * acc.ndim
            sel[axis] = np.flatnonzero(fr == f)
            y[tuple(sel)] = requantize(acc[tuple(sel)], int(f), self.out_fmt)
        return y


@dataclass(eq=False, kw_only=True)
class Dense(Affine):
    """W (in, out) weight codes, c (out,) int64."""
    kind = "dense"
    _out_axis = 1

    def run(self, xs, in_fmts):
        x = xs[0]
        if x.ndim != 2 or x.shape[1] != self.W.shape[0]:
            raise ValueError(f"dense {self.name!r} expects (N, {self.W.shape[0]}) codes, got {x.shape}")
        return self.requantize_channels(matmul_int(x, self.W.astype(np.int64)) + self.c, 1)


@dataclass(eq=False, kw_only=True)
class Conv2d(Affine):
    """W (out, in, kh, kw) weight codes, c (out,) int64; zero padding."""
    kind = "conv2d"
    stride: tuple = _attr("pair")
    padding: tuple = _attr("pair")
    W: np.ndarray = _array(4)

    def run(self, xs, in_fmts):
        x, W = xs[0], self.W.astype(np.int64)
        if x.ndim != 4 or x.shape[1] != W.shape[1]:
            raise ValueError(f"conv2d {self.name!r} expects (N, {W.shape[1]}, H, W) codes, got {x.shape}")
        acc = conv2d_int(x, W, self.stride, self.padding)
        return self.requantize_channels(acc + self.c.reshape(1, -1, 1, 1), 1)


@dataclass(eq=False, kw_only=True)
class Scale(Affine):
    """A BatchNorm on its own: W (C,) and c (C,), one per channel (axis 1)."""
    kind = "scale"
    W: np.ndarray = _array(1)

    def run(self, xs, in_fmts):
        x, shp = xs[0], channel_shape(xs[0].ndim)
        acc = x * self.W.astype(np.int64).reshape(shp) + self.c.reshape(shp)
        return self.requantize_channels(acc, 1)


@dataclass(eq=False, kw_only=True)
class _SameFormat(Record):
    """Ops whose output keeps the input format."""

    def link(self, in_fmts):
        if self.out_fmt != in_fmts[0]:
            raise ValueError(f"out_fmt must equal the input format for {self.kind}")


@dataclass(eq=False, kw_only=True)
class ReLU(_SameFormat):
    kind = "relu"

    def run(self, xs, in_fmts):
        return np.maximum(xs[0], 0).astype(self.out_fmt.code_dtype)


@dataclass(eq=False, kw_only=True)
class LeakyReLU(_SameFormat):
    """y = x if x > 0 else round_shift(x * slope_code, slope_frac); ``slope`` is informational."""
    kind = "leaky_relu"
    slope: float | None = _attr("float?")
    slope_code: int = _attr("int")
    slope_frac: int = _attr("int")

    def run(self, xs, in_fmts):
        x, f = xs[0], self.out_fmt
        neg = round_shift(x * self.slope_code, self.slope_frac, f.rounding)
        return overflow(np.where(x > 0, x, neg), f).astype(f.code_dtype)


@dataclass(eq=False, kw_only=True)
class _Pool(_SameFormat):
    kernel_size: tuple = _attr("pair")
    stride: tuple = _attr("pair")


@dataclass(eq=False, kw_only=True)
class MaxPool2d(_Pool):
    kind = "maxpool2d"

    def run(self, xs, in_fmts):
        return windows(xs[0], self.kernel_size, self.stride).max(axis=(-2, -1)).astype(self.out_fmt.code_dtype)


@dataclass(eq=False, kw_only=True)
class AvgPool2d(_Pool):
    """y = div_round(window sum, kh*kw): the exact mean, rounded (issue 24).  ``recip`` and
    ``recip_shift`` (round(2**30 / k), 30) are kept for readers of older files; unused."""
    kind = "avgpool2d"
    recip: int = _attr("int")
    recip_shift: int = _attr("int")

    def run(self, xs, in_fmts):
        s = windows(xs[0], self.kernel_size, self.stride).sum(axis=(-2, -1))
        r = div_round(s, self.kernel_size[0] * self.kernel_size[1], self.out_fmt.rounding)
        return overflow(r, self.out_fmt).astype(self.out_fmt.code_dtype)


@dataclass(eq=False, kw_only=True)
class Flatten(_SameFormat):
    kind = "flatten"

    def run(self, xs, in_fmts):
        return xs[0].reshape(xs[0].shape[0], -1).astype(self.out_fmt.code_dtype)


@dataclass(eq=False, kw_only=True)
class Add(Record):
    """Residual sum: both operands aligned exactly to the larger frac, added, requantised once."""
    kind = "add"
    n_inputs = 2

    def run(self, xs, in_fmts):
        a, b = xs
        if a.shape != b.shape:
            raise ValueError(f"add {self.name!r}: operand shapes {a.shape} and {b.shape} differ")
        fa, fb = in_fmts[0].frac, in_fmts[1].frac
        f = max(fa, fb)        # exact alignment to the finer operand, then one rounding
        return requantize(round_shift(a, fa - f) + round_shift(b, fb - f), f, self.out_fmt)


@dataclass(eq=False, kw_only=True)
class Lut(Record):
    """y = table[x - index_offset], a table of 2**in_width output codes (Sigmoid / Tanh)."""
    kind = "lut"
    function: str | None = _attr("str?")
    index_offset: int = _attr("int")
    table: np.ndarray = _array(1)

    def _check(self):
        t = self.table
        if t.size and (t.min() < self.out_fmt.min_code or t.max() > self.out_fmt.max_code):
            raise ValueError(f"table codes outside {self.out_fmt.hls_type}")

    def link(self, in_fmts):
        n = 1 << in_fmts[0].width
        if self.table.shape != (n,) or self.index_offset != in_fmts[0].min_code:
            raise ValueError(f"table must have 2**{in_fmts[0].width} = {n} entries indexed "
                             f"from code {in_fmts[0].min_code}, got {self.table.shape}")

    def run(self, xs, in_fmts):
        return self.table[xs[0] - self.index_offset].astype(self.out_fmt.code_dtype)


RECORD_TYPES = {cls.kind: cls for cls in (Input, Dense, Conv2d, Scale, ReLU, LeakyReLU, MaxPool2d, AvgPool2d,
                                          Flatten, Add, Lut)}
RECORD_KINDS = tuple(RECORD_TYPES)
_COMMON = ("kind", "name", "block", "inputs", "out_fmt")


def record_from_plain(i, rec) -> Record:
    """Record ``i`` from plain data ``{"attrs": dict, "arrays": dict}`` (a Record passes through).
    ValueError naming the record for anything missing or malformed."""
    if isinstance(rec, Record):
        return rec
    where = f"record {i}"
    if not isinstance(rec, dict) or not isinstance(rec.get("attrs"), dict):
        raise ValueError(f"{where}: expected a dict with 'attrs' (dict) and 'arrays' (dict)")
    attrs, arrays = rec["attrs"], rec.get("arrays", {})
    if not isinstance(arrays, dict):
        raise ValueError(f"{where}: 'arrays' must be a dict of numpy arrays")
    cls = RECORD_TYPES.get(attrs.get("kind"))
    if cls is None:
        raise ValueError(f"{where}: unknown kind {attrs.get('kind')!r}; known: {list(RECORD_KINDS)}")
    where = f"record {i} ({cls.kind} {attrs.get('name', '?')!r})"
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    attr_names = [k for k, m in meta.items() if "attr" in m]
    array_names = [k for k, m in meta.items() if "array" in m]
    for k in ["name", "out_fmt"] + [k for k in attr_names if not meta[k]["attr"].endswith("?")]:
        if k not in attrs:
            raise ValueError(f"{where}: missing attribute {k!r}")
    kw = {"inputs": attrs.get("inputs"), "info": {}, "extra": {}}
    for k, v in attrs.items():
        if k in _COMMON[1:] or k in attr_names:
            kw[k] = v
        elif k != "kind":
            kw["extra"][k] = v
    for k in array_names:
        if k not in arrays and not meta[k].get("optional"):
            raise ValueError(f"{where}: missing array {k!r}")
    for k, v in arrays.items():
        (kw if k in array_names else kw["info"])[k] = v
    try:
        return cls(**kw)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
