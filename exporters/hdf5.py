"""One HDF5 file per fixed-point export: float model, integer records, calibration data, traces.

The layout is specified in ``docs/hdf5-format.md`` (format ``bll_ref-fixedpoint``, version
:data:`FORMAT_VERSION`); a reader needs only that document, h5py and NumPy to rerun integer
inference and reproduce the stored traces bit for bit.

    e = export(model, "model.h5", x_cal, width=8)   # compile_integer + trace + write
    e = read("model.h5")                             # every dataset checked; ExportedModel
    validate("model.h5")                             # read + rebuild both models + shape check
    report = verify("model.h5")                      # rerun integer inference, compare traces

Everything on disk goes through one writer (:func:`_write_tree`) and comes back through one
reader (:func:`_read_tree`); :func:`_encode` / :func:`_decode` map an :class:`ExportedModel` to
and from that ``{hdf5 path: (array or None, attrs)}`` tree, and :func:`write` runs the decoder's
checks on the tree *before* writing, so a file that :func:`read` would reject is never written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import h5py
import numpy as np

from bll_ref import __version__
from bll_ref.fixedpoint import IntegerModel, QFormat, compile_integer
from bll_ref.layers import Layer, Sequential, layer_from_config, load_state_dict, state_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportFormatError", "ExportedModel", "export", "write",
           "read", "validate", "verify"]

FORMAT = "bll_ref-fixedpoint"
FORMAT_VERSION = 1
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
    records : list of {"attrs": dict, "arrays": {name: ndarray}}
        :class:`~bll_ref.fixedpoint.IntegerModel` records; records[0] is the input.
    traces : list of ndarray, one per record, shape (N, *record output shape), record code dtype
        integer output codes for the N traced calibration samples; traces[0] = input codes.
    calibration_x : (N, *input_shape) float array, the traced calibration inputs
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
        """Integer reference inference rebuilt from the records alone."""
        return IntegerModel.from_records(self.records)

    def float_model(self) -> Sequential:
        """The float model rebuilt from ``model_config`` and ``float_state``."""
        model = layer_from_config(self.model_config)
        load_state_dict(model, self.float_state)
        return model


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def export(model, path, calibration_x, *, width=8, rounding="nearest", overflow="saturate",
           percentile=100.0, n_traces=None, aux=None, meta=None, labels=None) -> ExportedModel:
    """Compile ``model`` to integer inference and write one HDF5 file (atomically).

    Parameters
    ----------
    model : Sequential of blocks, or a list of blocks (eval-mode BN statistics are used)
    path : str or PathLike, the file to write (replaced atomically; no half file on failure)
    calibration_x : (N, *input_shape) float array; all N samples calibrate the activation formats
    width, rounding, overflow, percentile : see :func:`bll_ref.fixedpoint.compile_integer`
    n_traces : int or None, store inputs and traces of the first ``n_traces`` samples (None: all N)
    aux : dict name -> array or None (feedback weights, heads; from ``checkpoint.load``)
    meta : JSON-able dict or None (e.g. the checkpoint's meta)
    labels : (N,) int array or None, labels of calibration_x (stored for the traced samples)

    Returns
    -------
    ExportedModel, equal to what :func:`read` returns for ``path``
    """
    model = _as_model(model)
    x = np.asarray(calibration_x)
    if x.ndim < 2 or x.shape[0] == 0 or x.dtype.kind != "f":
        raise ValueError(f"export expects calibration_x as a float array (N, *input_shape) with N >= 1, "
                         f"got {x.shape} {x.dtype}")
    n = x.shape[0] if n_traces is None else int(n_traces)
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"export: n_traces must be in 1..{x.shape[0]} (the calibration batch), got {n_traces}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"export: labels must be ({x.shape[0]},) integers like calibration_x, "
                             f"got {labels.shape} {labels.dtype}")
        labels = labels[:n].astype(np.int64)
    im = compile_integer(model, x, width=width, rounding=rounding, overflow=overflow, percentile=percentile)
    traces = im.run(im.quantize_input(x[:n]))
    e = ExportedModel(
        records=im.records, traces=traces, calibration_x=x[:n].copy(), model_config=model.config(),
        float_state=state_dict(model), aux={k: np.asarray(v) for k, v in (aux or {}).items()},
        labels=labels, meta=dict(meta or {}),
        options={"width": int(width), "rounding": rounding, "overflow": overflow,
                 "percentile": float(percentile), "n_calibration": int(x.shape[0])})
    write(e, path)
    return e


def write(exported: ExportedModel, path) -> str:
    """Write an :class:`ExportedModel` to ``path`` atomically (temporary file + rename).

    The tree is checked with the same code :func:`read` uses before anything touches the disk,
    so an inconsistent ExportedModel raises :class:`ExportFormatError` and writes nothing.
    Returns the path written.
    """
    path = os.fspath(path)
    tree = _encode(exported)
    _decode(tree, f"{path} (not written)")
    _write_tree(path, tree)
    return path


def read(path) -> ExportedModel:
    """Read and check an export file.

    Checks, in order: the file opens as HDF5 (truncated files do not), ``format`` and
    ``format_version`` (a newer version is refused), every dataset's SHA-256 checksum, the
    manifest of every dataset's dtype and shape (root attribute ``datasets``), every required
    group, dataset and attribute, every dtype and shape (float weights against the model config,
    code datasets against their Q-format attributes and the record, traces against the
    calibration batch), and the records themselves (:meth:`IntegerModel.from_records`).

    Raises
    ------
    FileNotFoundError : no file at ``path``
    ExportFormatError : anything else wrong; the message names the dataset / attribute
    """
    path = os.fspath(path)
    return _decode(_read_tree(path), path)


def validate(path) -> ExportedModel:
    """:func:`read` plus a dry run: rebuilds the float and the integer model and checks that one
    integer forward pass produces outputs of the stored trace shapes.  Returns the data."""
    path = os.fspath(path)
    e = read(path)
    try:
        e.float_model()
    except ValueError as err:
        raise ExportFormatError(f"{path}: /model does not fit the model_config attribute: {err}") from None
    got = _run(e, path, e.traces[0][:1])
    for i, (g, want) in enumerate(zip(got, e.traces)):
        if g.shape[1:] != want.shape[1:]:
            raise ExportFormatError(
                f"{path}: dataset {_node_path(i, e.records[i])}/data stores outputs of shape "
                f"{want.shape[1:]}, but record {i} computes {g.shape[1:]}; the file is inconsistent, re-export it")
    return e


def verify(path) -> dict:
    """Rerun integer inference from the file alone and compare with the stored traces.

    Returns
    -------
    dict with path, file_size (bytes), format_version, created_by, options, n_samples,
    ok (bool: every record bit-exact), n_mismatched, and records: one dict per record with
    index, kind, name, shape (per sample), format (hls type), max_abs_diff (int; None when the
    shapes differ) and n_diff (number of differing codes)
    """
    path = os.fspath(path)
    e = validate(path)
    got = _run(e, path, e.traces[0])
    rows = []
    for i, (rec, want, have) in enumerate(zip(e.records, e.traces, got)):
        a = rec["attrs"]
        if want.shape != have.shape:
            diff, n_diff = None, int(np.prod(want.shape))
        else:
            d = np.abs(want.astype(np.int64) - have.astype(np.int64))
            diff, n_diff = int(d.max(initial=0)), int(np.count_nonzero(d))
        rows.append({"index": i, "kind": a["kind"], "name": a["name"], "shape": list(want.shape[1:]),
                     "format": QFormat.from_dict(a["out_fmt"]).hls_type, "max_abs_diff": diff,
                     "n_diff": n_diff})
    bad = sum(r["n_diff"] > 0 for r in rows)
    return {"path": path, "file_size": os.path.getsize(path), "format_version": e.format_version,
            "created_by": e.created_by, "options": e.options, "n_samples": int(e.traces[0].shape[0]),
            "ok": bad == 0, "n_mismatched": bad, "records": rows}


# ------------------------------------------------------------------------------------------------
# ExportedModel <-> tree {hdf5 path: (ndarray or None for a group, attrs)}
# ------------------------------------------------------------------------------------------------
def _as_model(model):
    if isinstance(model, (list, tuple)):
        return Sequential(*model)
    if isinstance(model, Sequential):
        return model
    if isinstance(model, Layer):
        return Sequential(model)
    raise ValueError(f"export expects a Sequential of blocks or a list of blocks, got {type(model).__name__}")


def _rec_name(i, rec):
    return f"{i:03d}_{rec['attrs']['kind']}"


def _node_path(i, rec):
    """Trace node of record i, named by the record's layer path like the nodes of exporters.nir."""
    return f"/nodes/{rec['attrs']['name']}/observables/codes"


def _q_attrs(fmt) -> dict:
    """The Q-format attributes of a code dataset (signed as 0/1 for non-Python readers)."""
    fmt = QFormat.from_dict(fmt)
    return {"width": fmt.width, "frac": fmt.frac, "signed": int(fmt.signed), "rounding": fmt.rounding,
            "overflow": fmt.overflow, "hls_type": fmt.hls_type}


def _code_attrs(attrs, name):
    """Q-format attributes a record array must carry, or None for informational arrays."""
    kind = attrs["kind"]
    if kind in ("dense", "conv2d", "scale") and name == "W":
        return _q_attrs(attrs["w_fmt"])
    if kind in ("dense", "conv2d", "scale") and name == "c":
        w = QFormat.from_dict(attrs["w_fmt"])
        return {"width": _ACC_WIDTH, "frac": int(attrs["acc_frac"]), "signed": 1, "rounding": w.rounding,
                "overflow": "none", "hls_type": f"int64 at {int(attrs['acc_frac'])} fractional bits"}
    if kind == "lut" and name == "table":
        return _q_attrs({**attrs["out_fmt"], "overflow": "saturate"})
    return None


def _sha256(a) -> str:
    """SHA-256 of the element bytes, C order, little-endian (docs/hdf5-format.md)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def _json(v, what):
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{what}: value of type {type(o).__name__} is not JSON-able")
    return json.dumps(v, default=default, sort_keys=True)


def _encode(e: ExportedModel) -> dict:
    tree = {}

    def group(path, **attrs):
        tree[path] = (None, attrs)

    def dataset(path, a, **attrs):
        a = np.asarray(a)
        if a.dtype.kind not in "iuf":
            raise ValueError(f"{path}: only integer and float arrays are stored, got dtype {a.dtype}")
        tree[path] = (a, {**attrs, "sha256": _sha256(a)})

    if not e.traces or len(e.traces) != len(e.records):
        raise ValueError(f"ExportedModel needs one trace per record, got {len(e.traces)} traces for "
                         f"{len(e.records)} records")
    group("/", format=FORMAT, format_version=int(e.format_version), created_by=str(e.created_by),
          model_config=_json(e.model_config, "model_config"), meta=_json(e.meta, "meta"),
          options=_json(e.options, "options"), __type__="NIRGraphData")
    group("/model")
    for key, a in e.float_state.items():
        role, _, k = key.partition("/")
        if role not in ("params", "buffers") or not k:
            raise ValueError(f"float_state key {key!r} must look like 'params/<key>' or 'buffers/<key>'")
        dataset(f"/model/{_model_path(k)}", a, role=role[:-1])
    group("/integer", n_records=len(e.records))
    group("/integer/records")
    for i, rec in enumerate(e.records):
        a = rec["attrs"]
        g = f"/integer/records/{_rec_name(i, rec)}"
        group(g, kind=a["kind"], name=a["name"], record=_json(a, g))
        for name, arr in rec["arrays"].items():
            dataset(f"{g}/{name}", arr, **(_code_attrs(a, name) or {}))
    group("/aux")
    for key, arr in e.aux.items():
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"aux key {key!r} is not a valid HDF5 path below /aux")
        dataset(f"/aux/{key}", arr)
    n = int(np.shape(e.traces[0])[0])
    group("/calibration", n_calibration=int(e.options.get("n_calibration", n)), n_traced=n)
    dataset("/calibration/x", e.calibration_x)
    in_fmt = e.records[0]["attrs"]["out_fmt"]
    dataset("/calibration/x_codes", e.traces[0], **_q_attrs(in_fmt))
    if e.labels is not None:
        dataset("/calibration/labels", e.labels)
    group("/nodes")
    names = [rec["attrs"]["name"] for rec in e.records]
    if len(set(names)) != len(names) or any(not n or "/" in n or n in (".", "..") for n in names):
        raise ValueError(f"record names must be unique and free of '/' to name trace nodes, got {names}")
    for i, (rec, t) in enumerate(zip(e.records, e.traces)):
        t = np.asarray(t)
        node = _node_path(i, rec).rsplit("/", 2)[0]
        group(node, __type__="NIRNodeData", record=i)
        group(f"{node}/observables")
        group(f"{node}/observables/codes", __type__="TimeGriddedData", dt=1.0)
        dataset(f"{node}/observables/codes/data", t.reshape(t.shape[0], 1, -1),
                shape=np.array(t.shape[1:], dtype=np.int64), **_q_attrs(rec["attrs"]["out_fmt"]))
    tree["/"][1]["datasets"] = _json({p: [v[0].dtype.name, list(v[0].shape)] for p, v in tree.items()
                                      if v[0] is not None}, "datasets")
    return tree


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


def _decode(tree, source) -> ExportedModel:
    t = _Tree(tree, source)
    _check_header(t)
    _check_manifest(t)
    root = "/"
    if t.attr(root, "__type__", str) != "NIRGraphData":
        t.fail("root attribute '__type__' must be 'NIRGraphData'")
    model_config = t.json_attr(root, "model_config")
    meta, options = t.json_attr(root, "meta"), t.json_attr(root, "options")
    float_state = _decode_model(t, model_config)
    records = _decode_records(t)
    t.group("/aux")
    aux = {p[len("/aux/"):]: t.dataset(p) for p in t.datasets_below("/aux")}
    traces = _decode_traces(t, records)
    n = traces[0].shape[0]
    t.group("/calibration")
    if t.attr("/calibration", "n_traced", int) != n:
        t.fail(f"group /calibration attribute 'n_traced' is {t.attr('/calibration', 'n_traced', int)}, "
               f"but the traces hold {n} samples")
    t.attr("/calibration", "n_calibration", int)
    x = t.dataset("/calibration/x", shape=traces[0].shape)
    if x.dtype.kind != "f":
        t.fail(f"dataset /calibration/x has dtype {x.dtype}, expected float32 or float64")
    t.check_q("/calibration/x_codes", _q_attrs(records[0]["attrs"]["out_fmt"]))
    xc = t.dataset("/calibration/x_codes", shape=traces[0].shape)
    if not np.array_equal(xc, traces[0]):
        t.fail(f"dataset /calibration/x_codes differs from {_node_path(0, records[0])}/data (the input trace)")
    labels = None
    if "/calibration/labels" in tree:
        labels = t.dataset("/calibration/labels", shape=(n,))
        if labels.dtype.kind not in "iu":
            t.fail(f"dataset /calibration/labels has dtype {labels.dtype}, expected integers")
    return ExportedModel(records=records, traces=traces, calibration_x=x, model_config=model_config,
                         float_state=float_state, aux=aux, labels=labels, meta=meta, options=options,
                         created_by=t.attr(root, "created_by", str),
                         format_version=t.attr(root, "format_version", int))


def _check_header(t):
    if "/" not in t.t:
        t.fail("no root group")
    fmt = t.t["/"][1].get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        t.fail(f"root attribute 'format' is {fmt!r}, expected {FORMAT!r}: this is not a "
               "bll_ref fixed-point export", hint="export one with bll-ref export CHECKPOINT")
    v = t.attr("/", "format_version", int)
    if v > FORMAT_VERSION:
        t.fail(f"format version {v} is newer than supported {FORMAT_VERSION}",
               hint="upgrade bll_ref to read this file")
    if v < 1:
        t.fail(f"root attribute 'format_version' is {v}; versions start at 1")


def _check_manifest(t):
    """Root attribute 'datasets' lists every dataset with dtype and shape: nothing may be missing
    (optional and informational datasets included), added, retyped or reshaped."""
    listed = t.json_attr("/", "datasets")
    if not isinstance(listed, dict):
        t.fail("root attribute 'datasets' must be a JSON object {path: [dtype, shape]}")
    for p, spec in listed.items():
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], list)):
            t.fail(f"root attribute 'datasets' entry {p!r} must be [dtype, shape], got {spec!r}")
        if p not in t.t or t.t[p][0] is None:
            t.fail(f"missing dataset {p} (listed in the root attribute 'datasets')")
        a = t.t[p][0]
        if a.dtype.name != spec[0] or list(a.shape) != spec[1]:
            t.fail(f"dataset {p} is {a.dtype.name} {list(a.shape)}, but the root attribute 'datasets' "
                   f"lists {spec[0]} {spec[1]}")
    extra = sorted(p for p, v in t.t.items() if v[0] is not None and p not in listed)
    if extra:
        t.fail(f"dataset {extra[0]} is not listed in the root attribute 'datasets'")


def _decode_model(t, config):
    t.group("/model")
    try:
        expected = state_dict(layer_from_config(config))
    except (ValueError, KeyError, TypeError) as err:
        t.fail(f"root attribute 'model_config' does not describe a bll_ref model ({err})")
    state = {}
    for p in t.datasets_below("/model"):
        role = t.attr(p, "role", str)
        if role not in ("param", "buffer"):
            t.fail(f"dataset {p} attribute 'role' is {role!r}, expected 'param' or 'buffer'")
        state[f"{role}s/{p[len('/model/'):].replace('/', '.')}"] = t.dataset(p)
    for key, ref in expected.items():
        path = "/model/" + _model_path(key.partition("/")[2])
        if key not in state:
            t.fail(f"missing dataset {path} ({key.split('/')[0][:-1]} of the model in 'model_config')")
        t.dataset(path, dtype=ref.dtype, shape=ref.shape)
    extra = sorted(set(state) - set(expected))
    if extra:
        t.fail(f"/model holds arrays the model_config has no place for: {extra[:5]}")
    return state


def _decode_records(t):
    t.group("/integer")
    n = t.attr("/integer", "n_records", int)
    t.group("/integer/records")
    names = [p.rsplit("/", 1)[1] for p in t.children("/integer/records")]
    records = []
    for i in range(n):
        matches = [s for s in names if _REC_NAME.match(s) and int(_REC_NAME.match(s).group(1)) == i]
        if len(matches) != 1:
            t.fail(f"expected exactly one group /integer/records/{i:03d}_<kind> (n_records = {n}), "
                   f"found {len(matches)}")
        g = f"/integer/records/{matches[0]}"
        attrs = t.json_attr(g, "record")
        if not isinstance(attrs, dict) or attrs.get("kind") != _REC_NAME.match(matches[0]).group(2):
            t.fail(f"group {g} attribute 'record' has kind {attrs.get('kind') if isinstance(attrs, dict) else attrs!r}, "
                   "which does not match the group name")
        if t.attr(g, "kind", str) != attrs["kind"] or t.attr(g, "name", str) != attrs.get("name"):
            t.fail(f"group {g} attributes 'kind' / 'name' disagree with its 'record' attribute")
        arrays = {}
        for p in t.children(g):
            if t.kind(p) != "dataset":
                t.fail(f"unexpected group {p} inside a record")
            name = p.rsplit("/", 1)[1]
            try:
                q = _code_attrs(attrs, name)
            except (KeyError, ValueError, TypeError) as err:
                t.fail(f"group {g} attribute 'record' lacks the formats of array {name!r} ({err})")
            if q is not None:
                t.check_q(p, q)
            arrays[name] = t.dataset(p)
        records.append({"attrs": attrs, "arrays": arrays})
    extra = sorted(set(names) - {_rec_name(i, r) for i, r in enumerate(records)})
    if extra:
        t.fail(f"/integer/records holds groups beyond n_records = {n}: {extra[:5]}")
    try:
        IntegerModel.from_records(records)
    except ValueError as err:
        m = re.match(r"record (\d+)", str(err))
        where = f"group /integer/records/{_rec_name(int(m.group(1)), records[int(m.group(1))])}" if m else "/integer/records"
        t.fail(f"{where}: {err}")
    return records


def _decode_traces(t, records):
    t.group("/nodes")
    traces, n = [], None
    for i, rec in enumerate(records):
        node = _node_path(i, rec)
        for g, typ in ((node.rsplit("/", 2)[0], "NIRNodeData"), (node, "TimeGriddedData")):
            t.group(g)
            if t.attr(g, "__type__", str) != typ:
                t.fail(f"group {g} attribute '__type__' must be {typ!r}")
        if t.attr(node.rsplit("/", 2)[0], "record", int) != i:
            t.fail(f"group {node.rsplit('/', 2)[0]} attribute 'record' must be {i}")
        if t.attr(node, "dt", float) != 1.0:
            t.fail(f"group {node} attribute 'dt' must be 1.0 (one evaluation of a static network)")
        p = f"{node}/data"
        t.check_q(p, _q_attrs(rec["attrs"]["out_fmt"]))
        a = t.dataset(p)
        shape = tuple(t.attr(p, "shape", list))
        if a.ndim != 3 or a.shape[1] != 1 or a.shape[2] != int(np.prod(shape)) or (n is not None and a.shape[0] != n):
            t.fail(f"dataset {p} has shape {a.shape}, expected ({n if n is not None else 'N'}, 1, "
                   f"{int(np.prod(shape))}) for per-sample shape {shape}")
        if i == 0 and list(shape) != list(rec["attrs"]["shape"]):
            t.fail(f"dataset {p} attribute 'shape' is {list(shape)}, but the input record says {rec['attrs']['shape']}")
        n = a.shape[0]
        if n == 0:
            t.fail(f"dataset {p} holds no samples")
        traces.append(a.reshape((n,) + shape))
    extra = sorted(set(p.rsplit("/", 1)[1] for p in t.children("/nodes")) - {r["attrs"]["name"] for r in records})
    if extra:
        t.fail(f"/nodes holds groups that match no record: {extra[:5]}")
    return traces


def _run(e, path, codes):
    try:
        return e.integer_model().run(codes)
    except (ValueError, IndexError) as err:
        raise ExportFormatError(f"{path}: integer inference from the file failed: {err}; "
                                "re-export the model") from None


# ------------------------------------------------------------------------------------------------
# the one writer and the one reader
# ------------------------------------------------------------------------------------------------
def _write_tree(path, tree):
    """Write ``tree`` to ``path`` through a temporary file in the same directory + os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"cannot write {path}: directory {d} does not exist")
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w", libver="earliest") as f:
            for p in sorted(tree):               # parents sort before their children
                _write_object(f, p, *tree[p])
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_object(f, path, data, attrs):
    if data is None:
        obj = f if path == "/" else f.require_group(path)
    else:
        obj = f.create_dataset(path, data=data, track_times=False)   # contiguous, uncompressed
    for k, v in attrs.items():
        obj.attrs[k] = v


def _read_tree(path):
    """Every group and dataset of the file with its attributes; checks each dataset's SHA-256."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; create one with bll-ref export CHECKPOINT --out {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ExportFormatError(f"{path}: cannot be opened as HDF5 ({err}); the file is truncated, still "
                                "being written or not an export; re-export the model") from None
    tree, where = {}, ["/"]
    # A damaged file can make the HDF5 library fail anywhere (OSError, RuntimeError, KeyError,
    # TypeError on garbled names, ...): every such failure means "damaged file", said once here.
    try:
        with f:
            tree["/"] = (None, dict(f.attrs))
            _check_header(_Tree(tree, path))     # a newer version may lay out things differently

            def visit(name, obj):
                where[0] = "/" + name
                attrs = dict(obj.attrs)
                if isinstance(obj, h5py.Dataset):
                    tree["/" + name] = (_checked_data(path, "/" + name, obj, attrs), attrs)
                elif isinstance(obj, h5py.Group):
                    tree["/" + name] = (None, attrs)
            f.visititems(visit)
    except ExportFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - see above
        raise ExportFormatError(f"{path}: cannot read {where[0]} ({type(err).__name__}: {err}); the file "
                                "is damaged; re-export the model") from None
    return tree


def _checked_data(path, name, obj, attrs):
    data = np.asarray(obj[()])
    if data.dtype.kind not in "iuf":
        raise ExportFormatError(f"{path}: dataset {name} is not numeric (dtype {data.dtype}); re-export the model")
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    if "sha256" not in attrs:
        raise ExportFormatError(f"{path}: dataset {name} has no attribute 'sha256'; re-export the model")
    if not isinstance(attrs["sha256"], str) or _sha256(data) != attrs["sha256"]:
        raise ExportFormatError(f"{path}: dataset {name} fails its SHA-256 checksum: its bytes changed after "
                                "export (corrupted or tampered); re-export the model or restore the file")
    return data
