"""Checkpoints: one ``.npz`` (allow_pickle=False) holding the model config as JSON, every parameter
and buffer, and optional auxiliary arrays (BLL heads, feedback weights). Written atomically."""
from __future__ import annotations

import json
import os

import numpy as np

from .fileio import atomic_open
from .layers import Sequential, layer_from_config, load_state_dict, state_dict

FORMAT = "bll_ref-checkpoint"
VERSION = 1


def save(path, blocks, meta=None, aux=None):
    """Write ``blocks`` (list of Sequential or the model Sequential) to ``path`` atomically.

    meta : JSON-able dict (method, options, results); aux : dict name -> array.
    """
    model = blocks if isinstance(blocks, Sequential) else Sequential(*blocks)
    header = {"format": FORMAT, "version": VERSION, "model": model.config(), "meta": meta or {}}
    arrays = {f"model/{k}": v for k, v in state_dict(model).items()}
    arrays.update({f"aux/{k}": np.asarray(v) for k, v in (aux or {}).items()})
    arrays["header"] = np.array(json.dumps(header))
    path = os.fspath(path)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load(path):
    """Returns (model Sequential of blocks, meta dict, aux dict). Clear errors for bad files."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile / value errors on truncated or foreign files
        raise ValueError(f"{path} is not a readable bll_ref checkpoint ({type(e).__name__}: {e})") from None
    if "header" not in arrays:
        raise ValueError(f"{path}: no 'header' entry; not a bll_ref checkpoint")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {header['version']} is newer than this bll_ref "
                         f"reads ({VERSION}); upgrade bll_ref")
    model = layer_from_config(header["model"])
    load_state_dict(model, {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    aux = {k[len("aux/"):]: v for k, v in arrays.items() if k.startswith("aux/")}
    return model, header["meta"], aux
