"""One HDF5 file per fixed-point export: float model, integer records, calibration data, traces.

The layout is specified in ``docs/hdf5-format.md`` (format ``bll_ref-fixedpoint``, version
:data:`FORMAT_VERSION`); a reader needs only that document, h5py and NumPy to rerun integer
inference and reproduce the stored traces bit for bit.

    e = export(model, "model.h5", x_cal, width=8)   # compile_integer + trace + write
    e = read("model.h5")                             # every dataset checked; ExportedModel
    validate("model.h5")                             # read + rebuild both models + shape check
    report = verify("model.h5")                      # rerun integer inference, compare traces

Everything on disk goes through one writer (:func:`_write_tree`, here) and comes back through one
reader (``exporters.hdf5_read``); :func:`_encode` / ``hdf5_read._decode`` map an
:class:`ExportedModel` to and from that ``{hdf5 path: (array or None, attrs)}`` tree, and
:func:`write` runs the decoder's checks on the tree *before* writing, so a file that :func:`read`
would reject is never written.  Names and attributes shared by both sides: ``exporters.hdf5_layout``.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from bll_ref.fileio import atomic_path
from bll_ref.fixedpoint import compile_integer
from bll_ref.layers import as_sequential, state_dict

from .hdf5_layout import (FORMAT, FORMAT_VERSION, ExportedModel, ExportFormatError, _code_attrs, _json, _model_path,
                          _node_path, _q_attrs, _rec_name, _sha256, _Tree, input_normalisation, record_widths)
from .hdf5_read import _decode, read_checked

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportFormatError", "ExportedModel", "export", "write",
           "read", "validate", "verify", "portable_meta"]

# training options that hold paths of the machine that trained (bll-ref train --out / --resume)
_PATH_OPTIONS = ("out", "resume")


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def export(model, path, calibration_x, *, width=8, rounding="nearest", overflow="saturate",
           percentile=100.0, n_traces=None, aux=None, meta=None, labels=None, calibration="percentile",
           per_channel=False, out_formats=None, output_width=None) -> ExportedModel:
    """Compile ``model`` to integer inference and write one HDF5 file (atomically).

    Parameters
    ----------
    model : Sequential of blocks, or a list of blocks (eval-mode BN statistics are used)
    path : str or PathLike, the file to write (replaced atomically; no half file on failure)
    calibration_x : ``(N, *input_shape)`` float array; all N samples calibrate the activation formats
    width, rounding, overflow, percentile, calibration, per_channel, out_formats, output_width : see
        :func:`bll_ref.fixedpoint.compile_integer` (per_channel files are format version 2)
    n_traces : int or None, store inputs and traces of the first ``n_traces`` samples (None: all N)
    aux : dict name -> array or None (feedback weights, heads; from ``checkpoint.load``)
    meta : JSON-able dict or None (e.g. the checkpoint's meta); its ``data`` entry decides the stored
        ``input_normalisation`` (:func:`exporters.hdf5_layout.input_normalisation`)
    labels : (N,) int array or None, labels of calibration_x (stored for the traced samples)

    Returns
    -------
    ExportedModel, equal to what :func:`read` returns for ``path``
    """
    model = as_sequential(model, "export")
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
    im = compile_integer(model, x, width=width, rounding=rounding, overflow=overflow, percentile=percentile,
                         calibration=calibration, per_channel=per_channel, out_formats=out_formats,
                         output_width=output_width)
    traces = im.run(im.quantize_input(x[:n]))
    e = ExportedModel(
        records=im.records, traces=traces, calibration_x=x[:n].copy(), model_config=model.config(),
        float_state=state_dict(model), aux={k: np.asarray(v) for k, v in (aux or {}).items()},
        labels=labels, meta=dict(meta or {}), format_version=FORMAT_VERSION,
        input_normalisation=input_normalisation(meta, im.records[0], x.dtype),
        options={"width": int(width), "rounding": rounding, "overflow": overflow,
                 "percentile": float(percentile), "n_calibration": int(x.shape[0]),
                 **({"calibration": calibration} if calibration != "percentile" else {}),
                 **({"per_channel": True} if per_channel else {}),
                 **({"out_formats": "given"} if out_formats else {}),
                 **({"output_width": int(output_width)} if output_width not in (None, width) else {})})
    write(e, path)
    return e


def portable_meta(meta, checkpoint) -> dict:
    """A checkpoint's meta with no local paths: ``checkpoint`` = the checkpoint's file name and the
    path-valued training options (``out``, ``resume``) reduced to their last component, so the same
    checkpoint exported from different directories gives byte-identical files."""
    meta = dict(meta or {})
    opts = meta.get("options")
    if isinstance(opts, dict):
        meta["options"] = {k: (os.path.basename(os.path.normpath(v)) if k in _PATH_OPTIONS and isinstance(v, str)
                               else v) for k, v in opts.items()}
    meta["checkpoint"] = os.path.basename(os.fspath(checkpoint))
    return meta


def write(exported: ExportedModel, path) -> str:
    """Write an :class:`ExportedModel` to ``path`` atomically (temporary file + rename).

    The tree is checked with the same code :func:`read` uses before anything touches the disk,
    so an inconsistent ExportedModel raises :class:`ExportFormatError` and writes nothing.
    Returns the path written.
    """
    path = os.fspath(path)
    source = f"{path} (not written)"
    try:
        im = exported.integer_model()
    except ValueError as err:
        _Tree({}, source).fail(f"/integer/records: {err}")
    tree = _encode(exported, im.records)
    _decode(tree, source, im.records)      # the records themselves were checked when made
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
    return read_checked(path)[0]


def validate(path) -> ExportedModel:
    """:func:`read` plus a dry run: rebuilds the float and the integer model and checks that one
    integer forward pass produces outputs of the stored trace shapes.  Returns the data."""
    path = os.fspath(path)
    e, im = _validated(path)
    _check_shapes(path, e, _run(im, path, e.traces[0][:1]))
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
    e, im = _validated(path)
    got = _run(im, path, e.traces[0])
    _check_shapes(path, e, got)
    rows = []
    for i, (rec, want, have) in enumerate(zip(e.records, e.traces, got)):
        if want.shape != have.shape:
            diff, n_diff = None, int(np.prod(want.shape))
        else:
            d = np.abs(want.astype(np.int64) - have.astype(np.int64))
            diff, n_diff = int(d.max(initial=0)), int(np.count_nonzero(d))
        rows.append({"index": i, "kind": rec.kind, "name": rec.name, "shape": list(want.shape[1:]),
                     "format": rec.out_fmt.hls_type, "max_abs_diff": diff, "n_diff": n_diff})
    bad = sum(r["n_diff"] > 0 for r in rows)
    return {"path": path, "file_size": os.path.getsize(path), "format_version": e.format_version,
            "created_by": e.created_by, "options": e.options, "n_samples": int(e.traces[0].shape[0]),
            "ok": bad == 0, "n_mismatched": bad, "records": rows}


# ------------------------------------------------------------------------------------------------
# ExportedModel <-> tree {hdf5 path: (ndarray or None for a group, attrs)}
# ------------------------------------------------------------------------------------------------
def _encode(e: ExportedModel, records) -> dict:
    """The tree of ``e`` with its records as the linked ``records``."""
    tree = {}

    def group(path, **attrs):
        tree[path] = (None, attrs)

    def dataset(path, a, **attrs):
        a = np.asarray(a)
        if a.dtype.kind not in "iuf":
            raise ValueError(f"{path}: only integer and float arrays are stored, got dtype {a.dtype}")
        tree[path] = (a, {**attrs, "sha256": _sha256(a)})

    if not e.traces or len(e.traces) != len(records):
        raise ValueError(f"ExportedModel needs one trace per record, got {len(e.traces)} traces for "
                         f"{len(records)} records")
    v3 = int(e.format_version) >= 3          # version 3: input_normalisation and the record widths
    group("/", format=FORMAT, format_version=int(e.format_version), created_by=str(e.created_by),
          model_config=_json(e.model_config, "model_config"), meta=_json(e.meta, "meta"),
          options=_json(e.options, "options"), __type__="NIRGraphData")
    if v3:
        norm = e.input_normalisation
        if norm is None:
            norm = input_normalisation(e.meta, records[0], np.asarray(e.calibration_x).dtype)
        tree["/"][1]["input_normalisation"] = _json(norm, "input_normalisation")
    group("/model")
    for key, a in e.float_state.items():
        role, _, k = key.partition("/")
        if role not in ("params", "buffers") or not k:
            raise ValueError(f"float_state key {key!r} must look like 'params/<key>' or 'buffers/<key>'")
        dataset(f"/model/{_model_path(k)}", a, role=role[:-1])
    group("/integer", n_records=len(records))
    group("/integer/records")
    for i, rec in enumerate(records):
        g = f"/integer/records/{_rec_name(i, rec)}"
        widths = record_widths(rec, [records[j].out_fmt for j in rec.inputs]) if v3 else {}
        group(g, kind=rec.kind, name=rec.name, record=_json(rec.attrs, g), **widths)
        for name, arr in rec.arrays.items():
            dataset(f"{g}/{name}", arr, **(_code_attrs(rec, name) or {}))
    group("/aux")
    for key, arr in e.aux.items():
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"aux key {key!r} is not a valid HDF5 path below /aux")
        dataset(f"/aux/{key}", arr)
    n = int(np.shape(e.traces[0])[0])
    group("/calibration", n_calibration=int(e.options.get("n_calibration", n)), n_traced=n)
    dataset("/calibration/x", e.calibration_x)
    dataset("/calibration/x_codes", e.traces[0], **_q_attrs(records[0].out_fmt))
    if e.labels is not None:
        dataset("/calibration/labels", e.labels)
    group("/nodes")
    names = [rec.name for rec in records]
    if len(set(names)) != len(names) or any(not n or "/" in n or n in (".", "..") for n in names):
        raise ValueError(f"record names must be unique and free of '/' to name trace nodes, got {names}")
    for i, (rec, t) in enumerate(zip(records, e.traces)):
        t = np.asarray(t)
        node = _node_path(i, rec).rsplit("/", 2)[0]
        group(node, __type__="NIRNodeData", record=i)
        group(f"{node}/observables")
        group(f"{node}/observables/codes", __type__="TimeGriddedData", dt=1.0)
        dataset(f"{node}/observables/codes/data", t.reshape(t.shape[0], 1, -1),
                shape=np.array(t.shape[1:], dtype=np.int64), **_q_attrs(rec.out_fmt))
    tree["/"][1]["datasets"] = _json({p: [v[0].dtype.name, list(v[0].shape)] for p, v in tree.items()
                                      if v[0] is not None}, "datasets")
    return tree


def _validated(path):
    """(ExportedModel, IntegerModel) of a file that :func:`read` accepts and whose /model fits its
    model_config."""
    e, im = read_checked(path)
    try:
        e.float_model()
    except ValueError as err:
        raise ExportFormatError(f"{path}: /model does not fit the model_config attribute: {err}") from None
    return e, im


def _run(im, path, codes):
    try:
        return im.run(codes)
    except (ValueError, IndexError) as err:
        raise ExportFormatError(f"{path}: integer inference from the file failed: {err}; "
                                "re-export the model") from None


def _check_shapes(path, e, got):
    """validate's dry run: the outputs ``got`` have the per-sample shapes of the stored traces."""
    for i, (g, want) in enumerate(zip(got, e.traces)):
        if g.shape[1:] != want.shape[1:]:
            raise ExportFormatError(
                f"{path}: dataset {_node_path(i, e.records[i])}/data stores outputs of shape "
                f"{want.shape[1:]}, but record {i} computes {g.shape[1:]}; the file is inconsistent, re-export it")


# ------------------------------------------------------------------------------------------------
# the one writer (the one reader is exporters.hdf5_read)
# ------------------------------------------------------------------------------------------------
def _write_tree(path, tree):
    """Write ``tree`` to ``path`` atomically (temporary file beside it, fsync, os.replace)."""
    with atomic_path(path, fsync=True) as tmp:
        with h5py.File(tmp, "w", libver="earliest") as f:
            for p in sorted(tree):               # parents sort before their children
                _write_object(f, p, *tree[p])


def _write_object(f, path, data, attrs):
    if data is None:
        obj = f if path == "/" else f.require_group(path)
    else:
        obj = f.create_dataset(path, data=data, track_times=False)   # contiguous, uncompressed
    for k, v in attrs.items():
        obj.attrs[k] = v

