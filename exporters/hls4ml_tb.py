"""hls4ml test vectors: the traced samples of an export as the two text files the testbench that
hls4ml generates reads, plus a per-layer precision table in hls4ml's vocabulary (docs/hls4ml-testbench.md)::

    write_tb("model.h5", "tb_data")      # or an ExportedModel from exporters.hdf5.export / read
    -> tb_data/tb_input_features.dat     one sample per line, space-separated input values
       tb_data/tb_output_predictions.dat one sample per line, the integer model's output values
       tb_data/hls4ml_precision.json     hls4ml's HLSConfig (ap_fixed<W,I,Q,O> per layer, sigmoid / tanh
                                         table_size) keyed by the names hls4ml gives the layers

hls4ml's ``myproject_test.cpp`` reads each line with ``strtok(line, " ")`` and ``atof`` into a
``std::vector<float>`` and copies it into the input array (``nnet::copy_data``).  Every value
written here is a fixed-point value ``code * 2^-frac`` with at most 16 significant bits, printed as
the shortest decimal that reads back to the same double, so ``atof`` and the cast to float give
exactly that value: the input needs no further rounding, and the predictions are the integer
model's output codes scaled exactly (bit-exact expectations, not float predictions).
"""
from __future__ import annotations

import os
import re

import numpy as np

from bll_ref.fileio import atomic_open, write_json_atomic
from bll_ref.fixedpoint import QFormat
from bll_ref.fixedpoint import records as R

from .hdf5 import read
from .hdf5_layout import avgpool_extra_frac, common_frac_affine, record_widths

__all__ = ["write_tb", "precision_table", "hls4ml_names", "avgpool_extra_frac", "lut_table_size", "fixed_values",
           "LAYOUTS", "INPUT_FILE", "OUTPUT_FILE", "PRECISION_FILE"]

INPUT_FILE, OUTPUT_FILE, PRECISION_FILE = "tb_input_features.dat", "tb_output_predictions.dat", "hls4ml_precision.json"
LAYOUTS = ("channels_first", "channels_last")
_HLS_Q = {"floor": "AP_TRN", "nearest": "AP_RND", "nearest_even": "AP_RND_CONV"}
_HLS_O = {"saturate": "AP_SAT", "wrap": "AP_WRAP"}
# the input range hls4ml's sigmoid / tanh tables cover (nnet_activation.h: index = x * table_size / 16
# + table_size / 2 for sigmoid, x * table_size / 8 + table_size / 2 for tanh, clamped to the table)
_TABLE_RANGE = {"sigmoid": 16, "tanh": 8}


def fixed_values(codes, fmt) -> np.ndarray:
    """Codes -> their exact float64 values code * 2^-frac."""
    return np.ldexp(np.asarray(codes, dtype=np.int64).astype(np.float64), -QFormat.from_dict(fmt).frac)


def _per_sample(a, layout):
    """(N, *shape) -> (N, prod(shape)) in C order; channels_last moves C of (N, C, H, W) last."""
    if layout == "channels_last" and a.ndim == 4:
        a = a.transpose(0, 2, 3, 1)
    return a.reshape(a.shape[0], -1)


def _write_dat(path, values):
    """One sample per line, values separated (and ended) by one space, as hls4ml's own writer does."""
    with atomic_open(path, "w") as fh:
        for row in values:
            fh.write("".join(repr(float(v)) + " " for v in row) + "\n")


def _ap(width, frac, rounding, overflow, signed=True):
    base = "ap_fixed" if signed else "ap_ufixed"
    return f"{base}<{width},{width - frac},{_HLS_Q[rounding]},{_HLS_O[overflow]}>"


def hls4ml_names(records) -> dict:
    """bll_ref record name -> the layer name hls4ml's PyTorch frontend gives the same layer.

    hls4ml names each layer after its torch.fx node: a leaf module's qualified name with every
    character that is not ``[0-9a-zA-Z_]`` replaced by ``_`` and ``_`` put before a leading digit
    (``"1.0"`` -> ``"_1_0"``), a ``+`` between tensors ``"add"``, ``"add_1"``, ... in execution order,
    the input its forward argument (``"x"`` here).  This holds for a PyTorch twin whose module tree
    mirrors the bll_ref model (same Sequential indices, a Residual's ``body`` / ``shortcut``
    submodules and ``body(x) + shortcut(x)``, BatchNorm folded into the Dense / Conv2d before it so
    that its index is left out): docs/hls4ml-testbench.md.
    """
    out, n_add = {}, 0
    for i, rec in enumerate(records):
        if i == 0:
            out[rec.name] = "x"
        elif isinstance(rec, R.Add):
            out[rec.name] = "add" if n_add == 0 else f"add_{n_add}"
            n_add += 1
        else:
            fx = re.sub(r"[^0-9a-zA-Z_]+", "_", rec.name.split("+")[0])
            out[rec.name] = f"_{fx}" if fx[:1].isdigit() else fx
    return out


def lut_table_size(rec, in_fmt):
    """hls4ml ``table_size`` that gives one table entry per input code of a sigmoid / tanh record
    (``range * 2**F_in``, range 16 / 8), and whether hls4ml's clamping outside its input range
    ``[-range/2, range/2)`` changes no output; ``(None, False)`` when ``range * 2**F_in`` is not an
    integer >= 2."""
    rng = _TABLE_RANGE.get(rec.function)
    if rng is None or in_fmt.frac < 2 - rng.bit_length():          # fewer than 2 entries
        return None, False
    size = rng << in_fmt.frac if in_fmt.frac >= 0 else rng >> -in_fmt.frac
    half = size // 2
    codes = np.arange(in_fmt.min_code, in_fmt.max_code + 1)
    clamped = np.clip(codes, max(-half, in_fmt.min_code), min(half - 1, in_fmt.max_code))
    t = rec.table.astype(np.int64)
    return size, bool(np.array_equal(t[codes - rec.index_offset], t[clamped - rec.index_offset]))


def _layer(rec, in_fmts):
    """The hls4ml precision entries of one record, and a note on how hls4ml's layer compares."""
    f = rec.out_fmt
    p = {"result": f.hls_type}
    note, extra = None, {}
    if isinstance(rec, R.Affine):
        d = common_frac_affine(rec)[3]
        # hls4ml's ONNX route (our QONNX writes nearest as Add half a step, then FLOOR) folds the half
        # step into the bias: bias and accum must hold c + 2^(s-1) too, s = acc_frac - out frac, else the
        # bias saturates (a 784-32 Dense lost 2 codes). At most one bit more; no value changes elsewhere.
        acc_frac = common_frac_affine(rec)[2]
        half = 1 << (acc_frac - f.frac - 1) if f.rounding == "nearest" and acc_frac > f.frac else 0
        w = record_widths(rec, in_fmts, bias_extra=half)
        wf = rec.w_fmt
        p[("scale" if isinstance(rec, R.Scale) else "weight")] = _ap(wf.width + d, wf.frac + d, wf.rounding,
                                                                     wf.overflow, wf.signed)
        p["bias"] = _ap(w["bias_width"], w["bias_frac"], f.rounding, f.overflow)
        p["accum"] = _ap(w["accum_width"], w["accum_frac"], f.rounding, f.overflow)
        note = ("bias codes and every partial sum are exact in these types; result = the accumulator "
                "converted with the result type's rounding and overflow")
        if d:
            note += (f"; per-channel weight formats (fracs {int(rec.w_frac.min())}..{int(rec.w_frac.max())}) "
                     f"are held exactly by one weight type {d} bits wider")
    elif isinstance(rec, R.LeakyReLU):
        p["param"] = _ap(16, rec.slope_frac, f.rounding, "saturate")
        note = (f"slope {rec.slope} as the 16-bit code {rec.slope_code} at {rec.slope_frac} fractional bits; "
                "y = x * slope rounded to the result type for x <= 0")
    elif isinstance(rec, R.AvgPool2d):
        k = rec.kernel_size[0] * rec.kernel_size[1]
        e = avgpool_extra_frac(k)
        w = record_widths(rec, in_fmts)
        p["accum"] = _ap(w["accum_width"], w["accum_frac"], f.rounding, f.overflow)
        note = (f"window sum exact in accum; hls4ml's accum / {k} keeps {e} fractional bits more than the input "
                f"(2^{e} >= 2*{k}), so converting it to result gives exactly the rounded mean bll_ref computes")
    elif isinstance(rec, R.Lut):
        t = QFormat(f.width, f.frac, f.signed, f.rounding, "saturate")
        p["table"] = t.hls_type
        # hls4ml 1.3.0 types an Activation's table from the layer-level key table_t (Layer.__init__
        # applies *_t keys), not from Precision.table: without it the entries are cut to fixed<18,8>
        extra["table_t"] = t.hls_type
        size, clamp_ok = lut_table_size(rec, in_fmts[0])
        extra["table_size"] = size
        note = (f"{rec.function} table of 2^{in_fmts[0].width} entries indexed by every input code; "
                + (f"table_size {size} = {_TABLE_RANGE[rec.function]} * 2^{in_fmts[0].frac} gives hls4ml one entry "
                   "per input code" + ("" if clamp_ok else ", but inputs outside hls4ml's table range clamp to "
                                       "an entry that differs: copy the HDF5 dataset 'table'")
                   if size else "no table_size gives one entry per code: copy the HDF5 dataset 'table'"))
    elif isinstance(rec, R.Add):
        note = "operands aligned exactly, added, converted once to the result type (hls4ml Merge 'add')"
    return p, note, extra


def precision_table(exported) -> dict:
    """The per-layer precision table (JSON-able) of an export, in hls4ml's configuration vocabulary.

    ``HLSConfig`` is hls4ml's configuration dictionary (``Model`` / ``LayerName`` / ``<name>`` /
    ``Precision`` with ``weight``, ``bias``, ``result``, ``accum`` and, where hls4ml names them so,
    ``scale``, ``param``, ``table``; ``table_size`` beside ``Precision`` for sigmoid / tanh), keyed
    by the names hls4ml gives the layers (:func:`hls4ml_names`).  ``layers`` lists every record with
    its kind, bll_ref name, hls4ml name, inputs, per-sample output shape, fracs and a note on
    bit-exactness.
    """
    records = exported.records
    fmts = [r.out_fmt for r in records]
    hls_names = hls4ml_names(records)
    names, layers = {}, []
    for i, rec in enumerate(records):
        p, note, extra = ({"result": rec.out_fmt.hls_type}, "the input codes", {}) if i == 0 else \
            _layer(rec, [fmts[j] for j in rec.inputs])
        names[hls_names[rec.name]] = {"Precision": p, **{k: v for k, v in extra.items() if v is not None}}
        layers.append({"index": i, "kind": rec.kind, "name": rec.name, "hls4ml_name": hls_names[rec.name],
                       "inputs": list(rec.inputs),
                       "shape": list(exported.traces[i].shape[1:]), "result_frac": rec.out_fmt.frac,
                       "Precision": p, **extra,
                       **({"acc_frac": common_frac_affine(rec)[2]} if isinstance(rec, R.Affine) else {}),
                       **({"note": note} if note else {})})
    return {"format": "bll_ref-hls4ml-precision", "version": 2,
            "HLSConfig": {"Model": {"Precision": records[0].out_fmt.hls_type}, "LayerName": names},
            "input": {"name": records[0].name, "hls4ml_name": hls_names[records[0].name],
                      "precision": records[0].out_fmt.hls_type},
            "output": {"name": records[-1].name, "hls4ml_name": hls_names[records[-1].name],
                       "precision": records[-1].out_fmt.hls_type},
            "layers": layers}


def write_tb(exported, out_dir, *, layout="channels_first") -> dict:
    """Write the hls4ml test vectors of an export (its traced samples) and its precision table.

    Parameters
    ----------
    exported : ExportedModel (``exporters.hdf5.export`` / ``read``) or the path of an export file
    out_dir : directory to write into (created; hls4ml expects the files in ``<project>/tb_data``)
    layout : "channels_first" writes image inputs / outputs in the model's (C, H, W) order
        (hls4ml's PyTorch ``channels_last_conversion='full'``, its default, or ``'off'``);
        "channels_last" in (H, W, C) order (``'internal'``: the user converts the inputs).
        Vectors are the same either way.

    Returns
    -------
    dict input / output / precision -> path written
    """
    if layout not in LAYOUTS:
        raise ValueError(f"write_tb: layout must be one of {LAYOUTS}, got {layout!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"write_tb: {out_dir} is a file, not a directory; give a directory for the test "
                         "vectors (hls4ml reads them from <project>/tb_data)")
    if isinstance(exported, (str, os.PathLike)):
        exported = read(exported)
    os.makedirs(out_dir, exist_ok=True)
    recs, traces = exported.records, exported.traces
    paths = {"input": os.path.join(out_dir, INPUT_FILE), "output": os.path.join(out_dir, OUTPUT_FILE),
             "precision": os.path.join(out_dir, PRECISION_FILE)}
    _write_dat(paths["input"], _per_sample(fixed_values(traces[0], recs[0].out_fmt), layout))
    _write_dat(paths["output"], _per_sample(fixed_values(traces[-1], recs[-1].out_fmt), layout))
    table = precision_table(exported)
    table["layout"] = layout
    table["n_samples"] = int(traces[0].shape[0])
    write_json_atomic(paths["precision"], table)
    return paths
