"""The one reader of export files: HDF5 -> checked tree -> :class:`ExportedModel`.

:func:`_read_tree` reads every group and dataset with its attributes and checks each dataset's
SHA-256; :func:`_decode` checks the tree against ``docs/hdf5-format.md`` (the writer runs it too,
before writing) and returns the data with its :class:`~bll_ref.fixedpoint.IntegerModel`.
"""
from __future__ import annotations

import dataclasses
import os
import re

import h5py
import numpy as np

from bll_ref.fileio import regular_input
from bll_ref.memory import check_fits
from bll_ref.fixedpoint import IntegerModel, quantize
from bll_ref.fixedpoint import records as R
from bll_ref.fixedpoint.records import record_from_plain
from bll_ref.layers import layer_from_config, state_dict

from .hdf5_layout import (_REC_NAME, FORMAT, MAX_FORMAT_VERSION, WIDTH_KEYS, ExportedModel, ExportFormatError,
                          _code_attrs, _decode_normalisation, _model_path, _node_path, _q_attrs, _rec_name,
                          _sha256, _Tree, needed_version, record_widths)

__all__ = ["read_checked"]


def _decode(tree, source, known=None):
    """Check ``tree`` and return (ExportedModel, its IntegerModel); ``known``: see _decode_records."""
    t = _Tree(tree, source)
    _check_header(t)
    _check_manifest(t)
    root = "/"
    if t.attr(root, "__type__", str) != "NIRGraphData":
        t.fail("root attribute '__type__' must be 'NIRGraphData'")
    model_config = t.json_attr(root, "model_config")
    meta, options = t.json_attr(root, "meta"), t.json_attr(root, "options")
    float_state = _decode_model(t, model_config)
    im = _decode_records(t, known)
    records = im.records
    version = t.attr(root, "format_version", int)
    if version < needed_version(records):
        t.fail(f"records with per-channel weight formats (array w_frac) need format_version "
               f"{needed_version(records)}, the file says {version}")
    widths = _decode_widths(t, records, version)
    norm = _decode_normalisation(t, records[0], version)
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
    t.check_q("/calibration/x_codes", _q_attrs(records[0].out_fmt))
    xc = t.dataset("/calibration/x_codes", shape=traces[0].shape)
    if not np.array_equal(xc, traces[0]):
        t.fail(f"dataset /calibration/x_codes differs from {_node_path(0, records[0])}/data (the input trace)")
    if not np.all(np.isfinite(x)):
        t.fail("dataset /calibration/x holds NaN or inf")
    if not np.array_equal(quantize(x, records[0].out_fmt), xc):
        t.fail("dataset /calibration/x_codes differs from the quantised /calibration/x "
               f"(section 8: x_codes = overflow(R(x * 2^F)) in {records[0].out_fmt.hls_type})")
    labels = None
    if "/calibration/labels" in tree:
        labels = t.dataset("/calibration/labels", shape=(n,))
        if labels.dtype.kind not in "iu":
            t.fail(f"dataset /calibration/labels has dtype {labels.dtype}, expected integers")
    e = ExportedModel(records=records, traces=traces, calibration_x=x, model_config=model_config,
                      float_state=float_state, aux=aux, labels=labels, meta=meta, options=options,
                      created_by=t.attr(root, "created_by", str), format_version=version,
                      input_normalisation=norm, widths=widths)
    return e, im


def _decode_widths(t, records, version):
    """Version 3: each record group's accumulator / bias widths (section 6), equal to what the
    records give (hdf5_layout.record_widths); older files may lack them (None is returned)."""
    out = []
    for i, rec in enumerate(records):
        g = f"/integer/records/{_rec_name(i, rec)}"
        want = record_widths(rec, [records[j].out_fmt for j in rec.inputs])
        attrs = t.group(g)
        if version < 3 and not any(k in attrs for k in WIDTH_KEYS):
            out = None
            continue
        got = {}
        for k in WIDTH_KEYS:
            if k not in want:
                if k in attrs:
                    t.fail(f"group {g} has attribute {k!r}, but a {rec.kind!r} record has no "
                           f"{k.split('_')[0]} (section 6)")
                continue
            got[k] = t.attr(g, k, int)
            lo, hi = (1, 128) if k.endswith("width") else (-512, 512)
            if not lo <= got[k] <= hi:
                t.fail(f"group {g} attribute {k!r} is {got[k]}, outside {lo}..{hi}")
            if got[k] != want[k]:
                t.fail(f"group {g} attribute {k!r} is {got[k]}, but its record's codes need {want[k]} "
                       "(section 6: recomputed from the record and its input formats); the file was altered")
        if out is not None:
            out.append(got)
    return out


def _check_header(t):
    if "/" not in t.t:
        t.fail("no root group")
    fmt = t.t["/"][1].get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        t.fail(f"root attribute 'format' is {fmt!r}, expected {FORMAT!r}: this is not a "
               "bll_ref fixed-point export", hint="export one with bll-ref export CHECKPOINT")
    v = t.attr("/", "format_version", int)
    if v > MAX_FORMAT_VERSION:
        t.fail(f"format version {v} is newer than supported {MAX_FORMAT_VERSION}",
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


def _decode_records(t, known=None) -> IntegerModel:
    """The records of /integer/records as a linked IntegerModel.  ``known``: the records the tree
    was just encoded from (the writer's check), used as they are instead of being built again."""
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
        allowed = _record_datasets(attrs["kind"])
        for p in t.children(g):
            if t.kind(p) != "dataset":
                t.fail(f"unexpected group {p} inside a record")
            if allowed is not None and p.rsplit("/", 1)[1] not in allowed:
                t.fail(f"dataset {p} is not a dataset of a {attrs['kind']!r} record (allowed: "
                       f"{', '.join(sorted(allowed)) or 'none'})")
            arrays[p.rsplit("/", 1)[1]] = t.dataset(p)
        try:
            rec = known[i] if known is not None else record_from_plain(i, {"attrs": attrs, "arrays": arrays})
        except ValueError as err:
            t.fail(f"group {g}: {err}")
        for name in arrays:
            q = _code_attrs(rec, name)
            if q is not None:
                t.check_q(f"{g}/{name}", q)
        records.append(rec)
    extra = sorted(set(names) - {_rec_name(i, r) for i, r in enumerate(records)})
    if extra:
        t.fail(f"/integer/records holds groups beyond n_records = {n}: {extra[:5]}")
    try:
        im = IntegerModel(records)
    except ValueError as err:
        m = re.match(r"record (\d+)", str(err))
        where = f"group /integer/records/{_rec_name(int(m.group(1)), records[int(m.group(1))])}" if m else "/integer/records"
        t.fail(f"{where}: {err}")
    for i, rec in enumerate(records):
        bound = _int64_bound(rec, [im.formats[j] for j in rec.inputs])
        if bound >= _INT64_LIMIT:
            t.fail(f"group /integer/records/{_rec_name(i, rec)}: intermediate values of record {i} could reach "
                   f"{bound} >= 2^62 (section 10: files stay within int64)", hint="export with a smaller width")
    return im


# Informational datasets a record group may hold besides its kind's integer arrays (section 6).
_INFO_DATASETS = {"dense": ("W_float", "c_float"), "conv2d": ("W_float", "c_float"), "scale": ("W_float", "c_float")}
_INT64_LIMIT = 1 << 62


def _record_datasets(kind):
    """Names of the datasets a record group of ``kind`` may hold, or None for an unknown kind
    (record_from_plain names the unknown kind)."""
    cls = R.RECORD_TYPES.get(kind)
    if cls is None:
        return None
    return {f.name for f in dataclasses.fields(cls) if "array" in f.metadata} | set(_INFO_DATASETS.get(kind, ()))


def _int64_bound(rec, in_fmts):
    """Largest |value| any intermediate of ``rec`` can take for inputs in ``in_fmts`` (section 10):
    the accumulator of dense / conv2d / scale, the products of leaky_relu and avgpool2d, the aligned
    sum of add.  Requantize's left shifts are computed exactly without leaving int64."""
    if isinstance(rec, R.Affine):
        k = rec.W.shape[0] if isinstance(rec, R.Dense) else int(np.prod(rec.W.shape[1:])) if rec.W.ndim == 4 else 1
        w = int(np.abs(rec.W.astype(np.int64)).max(initial=0))
        return k * in_fmts[0].max_abs_code * w + int(np.abs(rec.c).max(initial=0))
    if isinstance(rec, R.LeakyReLU):
        return in_fmts[0].max_abs_code * abs(rec.slope_code)
    if isinstance(rec, R.AvgPool2d):
        return rec.kernel_size[0] * rec.kernel_size[1] * in_fmts[0].max_abs_code  # the window sum; then s / k
    if isinstance(rec, R.Add):
        f = max(fm.frac for fm in in_fmts)
        return sum(fm.max_abs_code << (f - fm.frac) for fm in in_fmts)
    return 0


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
        t.check_q(p, _q_attrs(rec.out_fmt))
        a = t.dataset(p)
        shape = tuple(t.attr(p, "shape", list))
        if a.ndim != 3 or a.shape[1] != 1 or a.shape[2] != int(np.prod(shape)) or (n is not None and a.shape[0] != n):
            t.fail(f"dataset {p} has shape {a.shape}, expected ({n if n is not None else 'N'}, 1, "
                   f"{int(np.prod(shape))}) for per-sample shape {shape}")
        if i == 0 and list(shape) != list(rec.shape):
            t.fail(f"dataset {p} attribute 'shape' is {list(shape)}, but the input record says {list(rec.shape)}")
        n = a.shape[0]
        if n == 0:
            t.fail(f"dataset {p} holds no samples")
        traces.append(a.reshape((n,) + shape))
    extra = sorted(set(p.rsplit("/", 1)[1] for p in t.children("/nodes")) - {r.name for r in records})
    if extra:
        t.fail(f"/nodes holds groups that match no record: {extra[:5]}")
    return traces


def _read_tree(path):
    """Every group and dataset of the file with its attributes; checks each dataset's SHA-256."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; create one with bll-ref export CHECKPOINT --out {path}")
    try:
        regular_input(path, "export file")  # a FIFO would block h5py's open
    except ValueError as e:
        raise ExportFormatError(str(e)) from None
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ExportFormatError(f"{path}: cannot be opened as HDF5 ({err}); the file is truncated, still "
                                "being written or not an export; re-export the model") from None
    tree, where, total = {}, ["/"], [0]
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
                    _check_declared(path, "/" + name, obj, total)
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


# A dataset declaring more than this many times the bytes it stores (and over 1 MiB) is refused
# before it is read: exports are written contiguous and uncompressed (stored = declared), while a
# small file can declare a GiB dataset that is never written (HDF5 returns the fill value).
MAX_DECLARED_RATIO, _DECLARED_FLOOR = 100, 1 << 20


def _check_declared(path, name, obj, total):
    """Declared size of ``obj`` against what the file stores and this machine's memory; ``total``
    (a one-element list) accumulates the declared bytes of the whole file."""
    n = int(obj.size) * obj.dtype.itemsize
    stored = obj.id.get_storage_size()
    if n > _DECLARED_FLOOR and n > MAX_DECLARED_RATIO * max(1, stored):
        raise ExportFormatError(f"{path}: dataset {name} declares {obj.shape} {obj.dtype} ({n:,} bytes) but "
                                f"the file stores {stored:,} bytes of it; refused before reading (damaged or "
                                "crafted file); re-export the model")
    total[0] += n
    try:
        check_fits(2 * total[0], f"{path}: its datasets")
    except ValueError as e:
        raise ExportFormatError(str(e)) from None


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
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):  # export writes finite weights only
        raise ExportFormatError(f"{path}: dataset {name} holds NaN or inf; an export of a finite checkpoint "
                                "never does (bll-ref export refuses a diverged one); re-export the model")
    return data


def read_checked(path):
    """(ExportedModel, IntegerModel) of the file at ``path``: read and hashed once, every check of
    :func:`exporters.hdf5.read` done once."""
    path = os.fspath(path)
    return _decode(_read_tree(path), path)
