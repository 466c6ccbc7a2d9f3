"""Checkpoints: one ``.npz`` (allow_pickle=False) holding the model config as JSON, every parameter
and buffer, and optional auxiliary arrays (BLL heads, feedback weights). Written atomically and
reproducibly (``fileio.write_npz``: the same model and meta give the same bytes).

``load`` trusts nothing in the file: it checks that it is a zip of ``.npy`` entries, reads every
entry's shape and dtype before reading data (absurd sizes are refused before any allocation), then
the header (types, required keys, nesting depth, layer sizes), and finally the arrays (exactly the
float dtype the header records, finite values). Every refusal is a ``ValueError`` naming the file
and the problem.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import zipfile

import numpy as np

from .fileio import npz_entries, regular_input, write_npz
from .memory import check_fits
from .layers import Sequential, layer_from_config, load_state_dict, state_dict

FORMAT = "bll_ref-checkpoint"
VERSION = 1
MAX_DEPTH = 32                 # nesting of the model config (real models: <= 5)
MAX_HEADER_CHARS = 1 << 24     # 16 MiB of JSON

__all__ = ["save", "save_entries", "block_entries", "load", "FORMAT", "VERSION", "config_elements"]


def save(path, blocks, meta=None, aux=None):
    """Write ``blocks`` (list of Sequential or the model Sequential) to ``path`` atomically.

    meta : JSON-able dict (method, options, results); aux : dict name -> array.
    """
    model = blocks if isinstance(blocks, Sequential) else Sequential(*blocks)
    arrays = ((f"model/{k}", v) for k, v in state_dict(model).items())
    aux = ((f"aux/{k}", np.asarray(v)) for k, v in (aux or {}).items())
    return save_entries(path, model.config(), itertools.chain(arrays, aux), meta)


def save_entries(path, config, entries, meta=None):
    """Write a checkpoint from its parts: ``config`` the model's (``Sequential.config()``), ``entries``
    (name, array) pairs in file order, ``model/params/...``, ``model/buffers/...`` (the names
    ``block_entries`` gives), then ``aux/...``; consumed one at a time (``fileio.write_npz``), so the
    arrays may arrive while the file is written. The header is the last entry, as in ``save``."""
    header = {"format": FORMAT, "version": VERSION, "model": config, "meta": meta or {}}
    return write_npz(path, itertools.chain(entries, [("header", np.array(json.dumps(header)))]))


def block_entries(k, block) -> tuple[dict, dict]:
    """(params, buffers) of ``block``, the k-th block of a model, under the names a checkpoint of the
    whole model gives them (``model/params/<k>.<key>``, ``model/buffers/<k>.<key>``). A whole model's
    entries are every block's params in block order, then every block's buffers."""
    own = state_dict(block)
    part = lambda kind: {f"model/{kind}/{k}.{n[len(kind) + 1:]}": v  # noqa: E731
                         for n, v in own.items() if n.startswith(kind + "/")}
    return part("params"), part("buffers")


# --------------------------------------------------------------------------- memory guard
def _ints(v):
    """Integer (or list of integers) hyperparameter -> list of ints; anything else -> []."""
    items = v if isinstance(v, (list, tuple)) else [v]
    return [int(i) for i in items if isinstance(i, int) and not isinstance(i, bool)]


def _prod(xs):
    return math.prod(max(0, x) for x in xs)


# hyperparameters that size arrays: an int >= 0 (or a list of them) wherever they appear
_SIZE_KEYS = {"in_features", "out_features", "num_features", "in_channels", "out_channels", "kernel_size",
              "stride", "padding", "num_embeddings", "dim", "max_len", "scale_factor", "width"}


def check_config(cfg, where="model"):
    """ValueError naming the first layer config that is not plain, well-typed data."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str):
        raise ValueError(f"{where}: a layer config must be an object with a string 'type', got {cfg!r:.80}")
    for key, v in cfg.items():
        if key in ("layers", "body", "shortcut"):
            subs = v if key == "layers" else [v]
            if key == "layers" and not isinstance(v, list):
                raise ValueError(f"{where}.layers must be a list, got {type(v).__name__}")
            for i, c in enumerate(subs):
                if not (key == "shortcut" and c is None):
                    check_config(c, f"{where}.{key}" + (f"[{i}]" if key == "layers" else ""))
        elif key in _SIZE_KEYS:
            items = v if isinstance(v, list) else [v]
            if not items or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise ValueError(f"{where} ({cfg['type']}): {key} must be an int >= 0, got {v!r:.40}")


def config_elements(cfg) -> int:
    """Number of parameter and buffer elements a layer config would allocate, computed without
    building it (an upper estimate for layer types it does not know: the two largest sizes)."""
    kind = cfg.get("type")
    if kind == "Sequential":
        return sum(config_elements(c) for c in cfg.get("layers", []) if isinstance(c, dict))
    if kind == "Residual":
        return sum(config_elements(cfg[k]) for k in ("body", "shortcut") if isinstance(cfg.get(k), dict))
    g = {k: _ints(v) for k, v in cfg.items()}
    one = {k: (v[0] if v else 0) for k, v in g.items()}
    if kind == "Dense":
        return (one.get("in_features", 0) + 1) * one.get("out_features", 0)
    if kind == "Conv2d":
        k = g.get("kernel_size") or [0]
        k = k * 2 if len(k) == 1 else k
        return (one.get("in_channels", 0) * _prod(k) + 1) * one.get("out_channels", 0)
    if kind in ("BatchNorm", "LayerNorm"):
        return 4 * one.get("num_features", 0)
    if kind == "Embedding":
        return one.get("num_embeddings", 0) * one.get("dim", 0)
    if kind == "PositionalEncoding":
        return one.get("max_len", 0) * one.get("dim", 0)
    if kind == "SelfAttention":
        return 4 * (one.get("dim", 0) + 1) * one.get("dim", 0)
    sizes = sorted((i for v in g.values() for i in v), reverse=True)[:2]
    return _prod(sizes) if len(sizes) == 2 else 0


# --------------------------------------------------------------------------- load
def _entries(path):
    """name -> (shape, dtype) of every .npy entry, read from the entry headers only."""
    try:
        return npz_entries(path)
    except ValueError as e:
        if str(e).startswith(path):
            raise ValueError(f"{e}; not a readable bll_ref checkpoint") from None
        raise


def _check_entries(path, entries):
    total = 0
    for name, (shape, dtype) in entries.items():
        if name == "header":
            if dtype.kind != "U" or shape != ():
                raise ValueError(f"{path}: 'header' must be one JSON string, got {dtype} {shape}")
            if dtype.itemsize // 4 > MAX_HEADER_CHARS:
                raise ValueError(f"{path}: header of {dtype.itemsize // 4:,} characters is absurdly long")
            continue
        if not name.startswith(("model/", "aux/")):
            raise ValueError(f"{path}: unexpected entry {name!r}; not a bll_ref checkpoint")
        # parameters are real floats; auxiliary arrays may also be integer (counters)
        if dtype.kind != "f" and (name.startswith("model/") or dtype.kind not in "iub"):
            raise ValueError(f"{path}: array {name} is {dtype}; checkpoints hold real "
                             f"{'float' if name.startswith('model/') else 'numeric'} arrays only")
        total += math.prod(shape) * dtype.itemsize
    if "header" not in entries:
        raise ValueError(f"{path}: no 'header' entry; not a bll_ref checkpoint")
    check_fits(total, f"{path}: its arrays")


def _depth(obj, limit, level=0):
    if level > limit:
        raise ValueError(f"nested more than {limit} levels deep")
    if isinstance(obj, dict):
        for v in obj.values():
            _depth(v, limit, level + 1)
    elif isinstance(obj, list):
        for v in obj:
            _depth(v, limit, level + 1)


def _parse_header(path, text):
    try:
        header = json.loads(text)
    except RecursionError:
        raise ValueError(f"{path}: header is nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    try:
        _depth(header, MAX_DEPTH + 2)
    except (ValueError, RecursionError):
        raise ValueError(f"{path}: header is nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    for key, kind in (("format", str), ("version", int), ("model", dict), ("meta", dict)):
        if key not in header:
            raise ValueError(f"{path}: header lacks the key {key!r}")
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise ValueError(f"{path}: header key {key!r} must be a {kind.__name__}, got "
                             f"{type(header[key]).__name__}")
    if header["format"] != FORMAT:
        raise ValueError(f"{path}: format {header['format']!r}, expected {FORMAT!r}")
    if header["version"] > VERSION:
        raise ValueError(f"{path}: checkpoint version {header['version']} is newer than this bll_ref "
                         f"reads ({VERSION}); upgrade bll_ref")
    meta = header["meta"]
    for key in ("method", "model", "data"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{path}: meta {key!r} must be a string, got {type(meta[key]).__name__}")
    if "options" in meta and not isinstance(meta["options"], dict):
        raise ValueError(f"{path}: meta 'options' must be an object, got {type(meta['options']).__name__}")
    for key in ("limit_train", "limit_test"):
        v = meta.get("options", {}).get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{path}: meta option {key!r} must be an int >= 1 or null, got {v!r}")
    return header


def _build(path, cfg):
    """The model of the header's config; sizes checked before anything is allocated."""
    try:
        check_config(cfg)
        n = config_elements(cfg)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: the model config is malformed ({e})") from None
    check_fits(8 * n, f"{path}: a model of {n:,} parameters")
    try:
        return layer_from_config(cfg)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError, MemoryError) as e:
        raise ValueError(f"{path}: the model config is invalid ({type(e).__name__}: {e})") from None


def _check_declared(path, model, entries):
    """Every model/ entry's declared shape and dtype (from its .npy header) is the one the header's
    model has, checked before the arrays are read: a file may not make us read more than its model."""
    own = {f"model/{k}": v for k, v in state_dict(model).items()}
    for name, (shape, dtype) in entries.items():
        if name in own and tuple(shape) != own[name].shape:
            raise ValueError(f"{path}: array {name} declares shape {tuple(shape)}, the model in the header "
                             f"has {own[name].shape}")
        if name.startswith("model/") and name not in own:
            raise ValueError(f"{path}: array {name} is not a parameter or buffer of the model in the header")


def _check_values(path, model, arrays):
    """Exactly the recorded float dtype (no silent cast) and finite values."""
    own = {f"model/{k}": v for k, v in state_dict(model).items()}
    for name, a in arrays.items():
        if name in own and a.dtype != own[name].dtype:
            raise ValueError(f"{path}: array {name} is {a.dtype}, the header records {own[name].dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: array {name} holds NaN or inf (the run diverged?); retrain, "
                             "e.g. with a lower --lr")


def load(path):
    """Returns (model Sequential of blocks, meta dict, aux dict).

    Raises FileNotFoundError for a missing file and ValueError naming the problem for anything
    else: not an npz, malformed header, absurd sizes, wrong dtypes, non-finite values.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a checkpoint file (try {path}/checkpoint.npz)")
    regular_input(path, "checkpoint")  # a FIFO would block, a pipe cannot seek
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .npz file (not a zip archive); expected a "
                         "checkpoint written by bll-ref train")
    try:
        entries = _entries(path)
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    _check_entries(path, entries)
    try:
        with np.load(path, allow_pickle=False) as z:
            header = _parse_header(path, str(z["header"]))
            model = _build(path, header["model"])
            _check_declared(path, model, entries)  # before any array is read
            arrays = {k: z[k] for k in z.files if k != "header"}
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path} is not a readable bll_ref checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # zipfile / value errors on truncated entries
        raise ValueError(f"{path} is not a readable bll_ref checkpoint ({type(e).__name__}: {e})") from None
    _check_values(path, model, arrays)
    try:
        load_state_dict(model, {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    aux = {k[len("aux/"):]: v for k, v in arrays.items() if k.startswith("aux/")}
    return model, header["meta"], aux
