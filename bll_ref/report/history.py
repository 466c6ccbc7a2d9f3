"""Reading a run directory for the report: ``history.json`` checked entry by entry, and the options
recorded in the JSON header of ``checkpoint.npz``.

Every problem is a :class:`ReportError` whose message is one line naming the file and what to do.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["ReportError", "read_run", "HISTORY_VERSION"]

HISTORY_VERSION = 1  # newest history.json layout this reader understands (files without "version" are 1)
_REQUIRED = ("method", "epochs", "test_acc", "train_loss", "epoch_seconds")
_PER_EPOCH = ("test_acc", "train_loss", "epoch_seconds")
# optional entries: scalars that must be finite numbers >= 0 where present (n_train: Infinity gave
# an OverflowError), and per-epoch lists whose items are finite numbers or null
_OPTIONAL_COUNTS = ("n_train", "train_samples", "batch_size", "train_eval_samples", "workers")
_OPTIONAL_PER_EPOCH = ("test_top3", "train_acc")


class ReportError(ValueError):
    """A run directory that cannot be reported; the message is one line naming the path."""


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v):
    return _is_number(v) and math.isfinite(v)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v, n=60):
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def _load_history(run_dir):
    path = os.path.join(run_dir, "history.json")
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise ReportError(f"{run_dir}: no history.json; is this a directory written by "
                          "`bll-ref train --out`?")
    try:
        with open(path, encoding="utf-8") as f:
            h = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not readable JSON ({type(e).__name__}: {e}); "
                          "the file is damaged, re-run training") from None
    _check_history(path, h)
    return h


def _check_history(path, h):
    if not isinstance(h, dict):
        raise ReportError(f"{path}: expected a JSON object with keys {', '.join(_REQUIRED)}, "
                          f"got a JSON {type(h).__name__}")
    version = h.get("version", 1)
    if not _is_int(version) or version < 1:  # "1" is not a newer version, it is not a version
        raise ReportError(f"{path}: 'version' must be a whole number >= 1, got {_short(version)}; "
                          "the file is damaged or not written by bll_ref")
    if version > HISTORY_VERSION:
        raise ReportError(f"{path}: history version {version!r} is newer than this bll_ref reads "
                          f"({HISTORY_VERSION}); upgrade bll_ref")
    missing = [k for k in _REQUIRED if k not in h]
    if h.get("method") == "bll" and "diagnostics" not in h:
        missing.append("diagnostics")
    if missing:
        raise ReportError(f"{path}: missing {', '.join(repr(k) for k in missing)} (written by an older "
                          "bll_ref or not a training history); re-run training with this version")
    if not isinstance(h["method"], str):
        raise ReportError(f"{path}: 'method' should be a string, got {h['method']!r}")
    for k in ("epochs",) + _PER_EPOCH:
        if not isinstance(h[k], list) or not all(_is_finite(v) for v in h[k]):
            raise ReportError(f"{path}: {k!r} should be a list of numbers (finite), got {_short(h[k])}")
    if not all(_is_int(e) and e >= 1 for e in h["epochs"]):
        raise ReportError(f"{path}: 'epochs' should be whole numbers >= 1, got {_short(h['epochs'])}")
    _check_optional(path, h)
    lengths = {k: len(h[k]) for k in ("epochs",) + _PER_EPOCH}
    if len(set(lengths.values())) != 1:
        raise ReportError(f"{path}: per-epoch lists differ in length "
                          f"({', '.join(f'{k} {n}' for k, n in lengths.items())}); the file is damaged")
    if not h["epochs"]:
        raise ReportError(f"{path}: no finished epoch recorded; the run stopped before its first epoch ended")
    if "diagnostics" in h:
        _check_diagnostics(path, h)


def _check_optional(path, h):
    """The entries a history may lack: counts, throughput, optional per-epoch lists, options."""
    for k in _OPTIONAL_COUNTS:
        if k in h and h[k] is not None and not (_is_finite(h[k]) and h[k] >= 0):
            raise ReportError(f"{path}: {k!r} should be a finite number >= 0, got {_short(h[k])}")
    sps = h.get("samples_per_s")
    if sps is not None and not (_is_finite(sps) or isinstance(sps, list) and all(_is_finite(v) for v in sps)):
        raise ReportError(f"{path}: 'samples_per_s' should be a finite number or a list of them, got {_short(sps)}")
    for k in _OPTIONAL_PER_EPOCH:
        if k in h and not (isinstance(h[k], list) and all(v is None or _is_finite(v) for v in h[k])):
            raise ReportError(f"{path}: {k!r} should be a list of finite numbers or nulls, got {_short(h[k])}")
    if "options" in h and not isinstance(h["options"], dict):
        raise ReportError(f"{path}: 'options' should be an object, got {_short(h['options'])}")


def _check_diagnostics(path, h):
    diags = h["diagnostics"]
    if not isinstance(diags, list) or len(diags) != len(h["epochs"]):
        raise ReportError(f"{path}: 'diagnostics' should be a list with one entry per epoch "
                          f"({len(h['epochs'])}), got {_short(diags)}")
    if h["method"] != "bll":
        return
    for i, d in enumerate(diags):
        blocks = d.get("blocks") if isinstance(d, dict) else None
        if not isinstance(blocks, list) or not all(isinstance(b, dict) and "block" in b for b in blocks):
            raise ReportError(f"{path}: diagnostics of epoch {h['epochs'][i]} miss the per-block list "
                              "'blocks' (entries with 'block', 'var_loss', ...); re-run training with this version")
        ids = [b["block"] for b in blocks]  # a list as id was unhashable, mixed types unsortable
        if not all(_is_int(k) for k in ids) or len(set(ids)) != len(ids):
            raise ReportError(f"{path}: diagnostics of epoch {h['epochs'][i]}: block ids should be distinct "
                              f"whole numbers, got {_short(ids)}")


def _checkpoint_meta(run_dir):
    """The ``meta`` dict from the JSON header of ``checkpoint.npz``, {} when absent or unreadable.

    Only the header entry is read (not the weights); an interrupted run has no checkpoint, which is
    fine: the history is what the report needs."""
    path = os.path.join(run_dir, "checkpoint.npz")
    if not os.path.isfile(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
        meta = header.get("meta", {})
        return meta if isinstance(meta, dict) else {}
    except Exception:  # a foreign or damaged checkpoint only loses the legend's options
        return {}


def read_run(run_dir) -> dict:
    """Read one run directory -> {"dir", "history", "meta", "options"}; ReportError when unusable."""
    run_dir = os.fspath(run_dir)
    h = _load_history(run_dir)
    meta = _checkpoint_meta(run_dir)
    options = dict(meta.get("options") or {}) if isinstance(meta.get("options"), dict) else {}
    if isinstance(h.get("options"), dict):
        options.update(h["options"])
    return {"dir": run_dir, "history": h, "meta": meta, "options": options}
