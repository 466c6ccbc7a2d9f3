"""The integer model: a list of layer records, checked once, run in integer arithmetic."""
from __future__ import annotations

import numpy as np

from .qformat import QFormat, _as_int64, dequantize, quantize
from .records import Input, Record, record_from_plain

__all__ = ["IntegerModel"]


class IntegerModel:
    """Integer-only reference inference over a list of layer records.

    Each record is a :class:`~bll_ref.fixedpoint.records.Record` (or its plain data
    ``{"attrs": dict (JSON-able), "arrays": dict[str, ndarray]}``, converted once); record 0 is the
    input, every other record reads the outputs of earlier ones (``inputs``).  Use
    :func:`compile_integer` to build one from a float model, :meth:`from_records` to rebuild one
    from an exported file.

    Record kinds (attrs beyond kind, name, block, inputs, out_fmt; arrays), see
    :func:`compile_integer` for the math:

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
        self._records = [record_from_plain(i, r) for i, r in enumerate(records)]
        self._fmts = [r.out_fmt for r in self._records]
        for i, rec in enumerate(self._records):
            _link(i, rec, self._fmts)

    @classmethod
    def from_records(cls, records) -> "IntegerModel":
        """Rebuild from records or their plain data (e.g. read back from HDF5)."""
        return cls(records)

    @property
    def records(self) -> list:
        """The layer records (treat as read-only)."""
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

    def _check_shape(self, x, who, what):
        shape = self._records[0].shape
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape or x.shape[0] == 0:
            raise ValueError(f"{who} expects {what} of shape (N, {', '.join(map(str, shape))}), got {x.shape}")

    def quantize_input(self, x) -> np.ndarray:
        """Float input ``(N, *input_shape)`` -> input codes."""
        x = np.asarray(x)
        self._check_shape(x, "IntegerModel", "input")
        return quantize(x, self.input_fmt)

    def run(self, x_codes) -> list:
        """Integer inference.  Returns the trace: one code array per record (trace[0] is the
        input codes, trace[-1] the model output), each of its record's ``out_fmt.code_dtype``."""
        x = _as_int64(x_codes, "IntegerModel.run")
        self._check_shape(x, "IntegerModel.run", "codes")
        f0 = self.input_fmt
        if x.min() < f0.min_code or x.max() > f0.max_code:
            raise ValueError(f"IntegerModel.run: input codes outside {f0.hls_type}; use quantize_input")
        trace = [x.astype(f0.code_dtype)]
        for rec in self._records[1:]:
            xs = [trace[j].astype(np.int64) for j in rec.inputs]
            trace.append(rec.run(xs, [self._fmts[j] for j in rec.inputs]))
        return trace

    def infer(self, x) -> np.ndarray:
        """Float in, float64 out: dequantize(run(quantize_input(x))[-1])."""
        return dequantize(self.run(self.quantize_input(x))[-1], self.output_fmt)

    def __len__(self):
        return len(self._records)

    def __repr__(self):
        rows = [f"  {i:3d} {r.kind:<11s} {r.name:<14s} {r.out_fmt.hls_type}" for i, r in enumerate(self._records)]
        return "IntegerModel(\n" + "\n".join(rows) + "\n)"


def _link(i, rec: Record, fmts):
    """Checks of record ``i`` against the records before it."""
    where = f"record {i} ({rec.kind} {rec.name!r})"
    if (i == 0) != isinstance(rec, Input):
        raise ValueError(f"{where}: the first record, and only it, must be the 'input' record")
    if any(not 0 <= j < i for j in rec.inputs):
        raise ValueError(f"{where}: 'inputs' must list {rec.n_inputs} indices of earlier records, "
                         f"got {list(rec.inputs)!r}")
    try:
        rec.link([fmts[j] for j in rec.inputs])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
