"""What an export file holds and how its objects are named: shared by the writer
(:mod:`exporters.hdf5`) and the reader (:mod:`exporters.hdf5_read`); the layout itself is
documented in ``docs/hdf5-format.md``."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from bll_ref import __version__
from bll_ref.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from bll_ref.fileio import to_json
from bll_ref.fixedpoint import IntegerModel, QFormat
from bll_ref.fixedpoint import records as R
from bll_ref.layers import Sequential, layer_from_config, load_state_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FORMAT_VERSION", "WIDTH_KEYS", "ExportFormatError", "ExportedModel",
           "needed_version", "common_frac_affine", "avgpool_extra_frac", "record_widths", "input_normalisation"]

FORMAT = "bll_ref-fixedpoint"
FORMAT_VERSION = 3            # the version written; 3 adds input_normalisation and the record widths
MAX_FORMAT_VERSION = 3        # the highest version read (2 added per-channel weight formats)
WIDTH_KEYS = ("accum_width", "accum_frac", "bias_width", "bias_frac")   # record group attributes, version 3
_Q_KEYS = ("width", "frac", "signed", "rounding", "overflow")
_ACC_WIDTH = 64               # bias codes ``c`` live in the int64 accumulator, never overflowed
_REC_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)$")


class ExportFormatError(ValueError):
    """The file is not a valid export: missing, truncated, tampered, inconsistent or too new.
    The message names the file and the HDF5 object (and attribute) at fault."""


@dataclass(eq=False)
class ExportedModel:
    """Everything an export file holds, as plain data (what :func:`read` returns).

    Attributes
    ----------
    records : list of :class:`~bll_ref.fixedpoint.records.Record` (plain-data dicts
        ``{"attrs": dict, "arrays": {name: ndarray}}`` are accepted too); records[0] is the input.
    traces : list of ndarray, one per record, shape ``(N, *record output shape)``, record code dtype
        integer output codes for the N traced calibration samples; traces[0] = input codes.
    calibration_x : ``(N, *input_shape)`` float array, the traced calibration inputs
    model_config : dict, ``Sequential.config()`` of the float model (a Sequential of blocks)
    float_state : dict "params/<key>" | "buffers/<key>" -> array, ``layers.state_dict(model)``
    aux : dict name -> array (BLL heads ``head{k}/...``, feedback ``feedback{k}/W``, ...)
    labels : (N,) int array or None, labels of the traced samples
    meta : JSON-able dict (training method, data, options, results)
    options : dict width, rounding, overflow, percentile, n_calibration (compile settings)
    created_by, format_version : provenance (filled in on write / read)
    input_normalisation : dict or None, raw sensor values -> input codes (:func:`input_normalisation`;
        None: derived from ``meta`` on write; None on read of a file older than version 3)
    widths : list of dict or None, one per record, its accumulator / bias widths (:func:`record_widths`)
        as read from a version-3 file (None otherwise; the writer always derives them from the records)
    """

    records: list
    traces: list
    calibration_x: np.ndarray
    model_config: dict
    float_state: dict
    aux: dict = field(default_factory=dict)
    labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    created_by: str = f"bll_ref {__version__}"
    format_version: int = FORMAT_VERSION
    input_normalisation: dict | None = None
    widths: list | None = None

    @property
    def calibration_codes(self) -> np.ndarray:
        """Input codes of the traced samples (= traces[0])."""
        return self.traces[0]

    def integer_model(self) -> IntegerModel:
        """Integer reference inference rebuilt from the records alone (records already checked
        are only linked, not checked again)."""
        return IntegerModel.from_records(self.records)

    def float_model(self) -> Sequential:
        """The float model rebuilt from ``model_config`` and ``float_state``."""
        model = layer_from_config(self.model_config)
        load_state_dict(model, self.float_state)
        return model


def needed_version(records) -> int:
    """The lowest format version that describes ``records``: 2 when a record has per-channel
    weight formats (array ``w_frac``, which a version-1 reader would ignore and misread), else 1
    (bll_ref writes :data:`FORMAT_VERSION`; a reader refuses a file below this version)."""
    return 2 if any(getattr(r, "w_frac", None) is not None for r in records) else 1


def common_frac_affine(rec):
    """A dense / conv2d / scale record's weight and bias codes at one common frac, for hls4ml's
    one type per tensor: per-channel weight formats (array ``w_frac``) are aligned to the finest
    channel by exact left shifts (channel axis 1 of a Dense ``W (in, out)``, 0 of a Conv2d
    ``W (out, in, kh, kw)`` and of a scale ``W (C,)``).  Returns (W int64, c int64, acc_frac, d)
    with d = the bits added."""
    W, c = rec.W.astype(np.int64), np.asarray(rec.c, np.int64)
    w_frac = getattr(rec, "w_frac", None)
    if w_frac is None:
        return W, c, rec.acc_frac, 0
    shift = np.asarray(w_frac, np.int64).max() - np.asarray(w_frac, np.int64)     # (out,)
    axis = 1 if isinstance(rec, R.Dense) else 0
    shape = [1] * W.ndim
    shape[axis] = -1
    d = int(shift.max())
    return W << shift.reshape(shape), c << shift, rec.acc_frac + d, d


def avgpool_extra_frac(k) -> int:
    """Fractional bits hls4ml's average-pooling accumulator needs beyond the input's for the exact
    rounded mean of a k-value window: ``e = ceil(log2(2*k))``.  hls4ml divides the window sum in
    ``accum_t`` (ap_fixed division: the quotient truncated at accum_t's frac), then converts it to
    the result type.  A mean ``s/k`` that is not a rounding breakpoint (an integer or a half, in
    code steps) lies at least ``1/(2*k)`` from every breakpoint, the truncated quotient within
    ``2**-e <= 1/(2*k)`` of ``s/k`` on the same side; a breakpoint is a multiple of ``2**-e``, so
    the quotient is exact there (docs/hls4ml-testbench.md)."""
    return (2 * int(k) - 1).bit_length()


def signed_bits(lo, hi):
    """Bits of the smallest two's complement integer type holding every integer in [lo, hi]."""
    return max(int(lo).bit_length() if lo < 0 else 0, int(hi).bit_length()) + 1


def record_widths(rec, in_fmts, bias_extra=0) -> dict:
    """Signed fixed-point types that hold a record's bias and every partial sum exactly, for inputs
    in ``in_fmts`` (the formats of ``rec.inputs``): ``{accum_width, accum_frac, bias_width, bias_frac}``
    for dense / conv2d / scale (both at common_frac_affine's frac), ``{accum_width, accum_frac}`` for
    avgpool2d (the window sum with avgpool_extra_frac more fractional bits), ``{}`` otherwise.
    The precision table of ``exporters.hls4ml_tb`` and the version-3 record attributes use these.
    ``bias_extra``: a value the bias and accumulator must hold on top of the largest bias (hls4ml's
    ONNX route folds nearest rounding's half step into the bias)."""
    if isinstance(rec, R.Affine):
        W, c, acc_frac, _ = common_frac_affine(rec)
        k = rec.W.shape[0] if isinstance(rec, R.Dense) else int(np.prod(rec.W.shape[1:])) if rec.W.ndim == 4 else 1
        c_lo, c_hi = int(c.min(initial=0)), int(c.max(initial=0)) + int(bias_extra)
        bound = k * in_fmts[0].max_abs_code * int(np.abs(W).max(initial=0)) + max(-c_lo, c_hi)
        return {"accum_width": signed_bits(-bound, bound), "accum_frac": int(acc_frac),
                "bias_width": signed_bits(c_lo, c_hi), "bias_frac": int(acc_frac)}
    if isinstance(rec, R.AvgPool2d):
        k = rec.kernel_size[0] * rec.kernel_size[1]
        e = avgpool_extra_frac(k)
        return {"accum_width": signed_bits(-k * in_fmts[0].max_abs_code, k * in_fmts[0].max_abs_code) + e,
                "accum_frac": in_fmts[0].frac + e}
    return {}


_FMNIST_SHAPES = ([784], [1, 28, 28])


def input_normalisation(meta, input_record, float_dtype) -> dict:
    """How raw sensor values become the input codes of ``input_record`` (root attribute
    ``input_normalisation``, docs/hdf5-format.md section 8), from what ``meta['data']`` says the
    model was trained on: Fashion-MNIST's ``bll_ref.data`` recipe (uint8 pixels / 255, minus
    FASHION_MNIST_MEAN, over FASHION_MNIST_STD, in ``float_dtype``), else status "unknown" with
    the reason."""
    fmt = {**input_record.out_fmt.to_dict(), "hls_type": input_record.out_fmt.hls_type}
    data = meta.get("data") if isinstance(meta, dict) else None
    shape = [int(s) for s in input_record.shape]
    if data == "fashion-mnist" and shape in _FMNIST_SHAPES:
        return {"status": "known", "data": "fashion-mnist", "raw_dtype": "uint8", "raw_min": 0, "raw_max": 255,
                "raw_shape": [28, 28], "input_shape": shape, "scale": 1 / 255, "scale_divisor": 255,
                "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD, "float_dtype": np.dtype(float_dtype).name,
                "recipe": "x = ((float(raw) / scale_divisor) - float(mean)) / float(std), each step in float_dtype "
                          "(IEEE round to nearest even), raw reshaped to input_shape in C order; "
                          "code = overflow(R(x * 2^frac)) with input_format's frac, rounding R and overflow",
                "input_format": fmt}
    if data == "fashion-mnist":
        why = f"meta says fashion-mnist, but the input shape {shape} is neither [784] nor [1, 28, 28]"
    elif data == "synthetic":
        why = ("trained on bll_ref's synthetic float data (meta data = 'synthetic'): drawn as floats by "
               "bll_ref.synthetic, there are no raw sensor values to normalise")
    elif data is None:
        why = "meta has no 'data' entry naming the training data"
    else:
        why = f"meta data = {data!r} is not image data that bll_ref.data knows"
    return {"status": "unknown", "reason": why, "input_format": fmt}


def _rec_name(i, rec):
    return f"{i:03d}_{rec.kind}"


def _node_path(i, rec):
    """Trace node of record i, named by the record's layer path like the nodes of exporters.nir."""
    return f"/nodes/{rec.name}/observables/codes"


def _q_attrs(fmt) -> dict:
    """The Q-format attributes of a code dataset (signed as 0/1 for non-Python readers)."""
    fmt = QFormat.from_dict(fmt)
    return {"width": fmt.width, "frac": fmt.frac, "signed": int(fmt.signed), "rounding": fmt.rounding,
            "overflow": fmt.overflow, "hls_type": fmt.hls_type}


def _code_attrs(rec, name):
    """Q-format attributes a record array must carry, or None for informational arrays."""
    if isinstance(rec, R.Affine) and name == "W":
        return _q_attrs(rec.w_fmt)
    if isinstance(rec, R.Affine) and name == "c":
        where = (f"int64 at {rec.acc_frac} fractional bits" if rec.w_frac is None else
                 f"int64 at {rec.acc_frac} + w_frac[o] - {rec.w_fmt.frac} fractional bits (per channel o)")
        return {"width": _ACC_WIDTH, "frac": rec.acc_frac, "signed": 1, "rounding": rec.w_fmt.rounding,
                "overflow": "none", "hls_type": where}
    if isinstance(rec, R.Lut) and name == "table":
        return _q_attrs(dataclasses.replace(rec.out_fmt, overflow="saturate"))
    return None


def _sha256(a) -> str:
    """SHA-256 of the element bytes, C order, little-endian (docs/hdf5-format.md)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def _json(v, what):
    try:
        return to_json(v, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"{what}: {err}") from None


def _model_path(key):
    """state_dict key "1.0.body.0.W" -> "1/0.body.0/W" (block / layer path / array name)."""
    parts = key.split(".")
    if len(parts) == 1:
        return key
    mid = ".".join(parts[1:-1])
    return "/".join([parts[0]] + ([mid] if mid else []) + [parts[-1]])


class _Tree:
    """Checked access to a tree read back (or about to be written); errors name the object."""

    def __init__(self, tree, source):
        self.t, self.source = tree, source

    def fail(self, msg, hint="re-export the model (bll-ref export) or restore the file from a copy"):
        raise ExportFormatError(f"{self.source}: {msg}; {hint}")

    def kind(self, path):
        return "group" if path == "/" or self.t[path][0] is None else "dataset"

    def group(self, path):
        if path not in self.t or self.t[path][0] is not None:
            self.fail(f"missing group {path}")
        return self.t[path][1]

    def dataset(self, path, dtype=None, shape=None):
        if path not in self.t or self.t[path][0] is None:
            self.fail(f"missing dataset {path}")
        a = self.t[path][0]
        if dtype is not None and a.dtype != np.dtype(dtype):
            self.fail(f"dataset {path} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if shape is not None and a.shape != tuple(shape):
            self.fail(f"dataset {path} has shape {a.shape}, expected {tuple(shape)}")
        return a

    def attr(self, path, name, typ):
        if path not in self.t:
            self.fail(f"missing object {path}")
        attrs = self.t[path][1]
        if name not in attrs:
            self.fail(f"{self.kind(path)} {path} has no attribute {name!r}")
        v = attrs[name]
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        ok = {str: isinstance(v, str),
              int: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)),
              float: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)),
              list: isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu"}[typ]
        if not ok:
            self.fail(f"{self.kind(path)} {path} attribute {name!r} must be {typ.__name__}, got {v!r}")
        return {str: str, int: int, float: float, list: lambda x: [int(i) for i in x]}[typ](v)

    def json_attr(self, path, name):
        s = self.attr(path, name, str)
        try:
            return json.loads(s)
        except json.JSONDecodeError as err:
            self.fail(f"{self.kind(path)} {path} attribute {name!r} is not valid JSON ({err})")

    def children(self, path):
        """Direct children of a group, as full paths."""
        pre = path.rstrip("/") + "/"
        return sorted(p for p in self.t if p.startswith(pre) and "/" not in p[len(pre):])

    def datasets_below(self, path):
        pre = path.rstrip("/") + "/"
        return sorted(p for p in self.t if p.startswith(pre) and self.t[p][0] is not None)

    def check_q(self, path, want):
        """Q-format attributes of a code dataset equal ``want`` and its dtype fits them."""
        self.dataset(path)
        for k in _Q_KEYS + ("hls_type",):
            got = self.attr(path, k, int if k in ("width", "frac", "signed") else str)
            if got != want[k]:
                self.fail(f"dataset {path} attribute {k!r} is {got!r}, but the record says {want[k]!r}")
        dtype = np.int64 if want["width"] == _ACC_WIDTH else QFormat(
            want["width"], want["frac"], bool(want["signed"])).code_dtype
        self.dataset(path, dtype=dtype)


_NORM_KEYS = {"raw_dtype": str, "raw_min": int, "raw_max": int, "raw_shape": list, "input_shape": list,
              "scale": float, "scale_divisor": int, "mean": float, "std": float, "float_dtype": str, "recipe": str}


def _decode_normalisation(t, input_rec, version):
    """Version 3: root attribute input_normalisation (section 8), checked; None for an older file
    without it."""
    if version < 3 and "input_normalisation" not in t.t["/"][1]:
        return None
    norm = t.json_attr("/", "input_normalisation")
    where = "root attribute 'input_normalisation'"
    if not isinstance(norm, dict) or norm.get("status") not in ("known", "unknown"):
        t.fail(f"{where} must be a JSON object with status 'known' or 'unknown'")
    fmt = {**input_rec.out_fmt.to_dict(), "hls_type": input_rec.out_fmt.hls_type}
    if norm.get("input_format") != fmt:
        t.fail(f"{where} field 'input_format' is {norm.get('input_format')!r}, but the input record says {fmt!r}")
    if norm["status"] == "unknown":
        if not isinstance(norm.get("reason"), str) or not norm["reason"]:
            t.fail(f"{where} has status 'unknown' but no 'reason'")
        return norm
    for k, typ in _NORM_KEYS.items():
        v = norm.get(k)
        ok = {str: isinstance(v, str), list: isinstance(v, list) and all(type(i) is int for i in v),
              int: type(v) is int, float: type(v) in (int, float) and np.isfinite(v)}[typ]
        if not ok:
            t.fail(f"{where} field {k!r} must be {typ.__name__}, got {v!r}")
    if norm["raw_dtype"] not in ("uint8", "uint16", "int8", "int16") or norm["float_dtype"] not in ("float32", "float64"):
        t.fail(f"{where}: raw_dtype {norm['raw_dtype']!r} / float_dtype {norm['float_dtype']!r} not supported")
    if not (norm["raw_min"] < norm["raw_max"] and norm["scale_divisor"] > 0 and norm["std"] > 0
            and norm["scale"] == 1 / norm["scale_divisor"]):
        t.fail(f"{where} needs raw_min < raw_max, scale_divisor > 0, scale = 1 / scale_divisor and std > 0")
    if norm["input_shape"] != [int(s) for s in input_rec.shape]:
        t.fail(f"{where} field 'input_shape' is {norm['input_shape']}, but the input record says {list(input_rec.shape)}")
    return norm
