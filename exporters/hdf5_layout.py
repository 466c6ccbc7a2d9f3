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
from bll_ref.fileio import to_json
from bll_ref.fixedpoint import IntegerModel, QFormat
from bll_ref.fixedpoint import records as R
from bll_ref.layers import Sequential, layer_from_config, load_state_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FORMAT_VERSION", "ExportFormatError", "ExportedModel",
           "needed_version"]

FORMAT = "bll_ref-fixedpoint"
FORMAT_VERSION = 1            # the version written for files that version 1 describes
MAX_FORMAT_VERSION = 2        # the highest version read; 2 adds per-channel weight formats
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
    weight formats (array ``w_frac``, which a version-1 reader would ignore and misread), else 1."""
    return 2 if any(getattr(r, "w_frac", None) is not None for r in records) else FORMAT_VERSION


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

