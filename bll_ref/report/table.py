"""The report's numbers and ``report.md``: one summary row per run, and the markdown around it.

Text that comes from a run (its directory name, its options) is escaped: a name cannot add rows,
headings or links to report.md.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from .history import _is_finite, _is_number

__all__ = ["summary_rows", "markdown", "file_stem", "printable"]

FASHION_MNIST_TRAIN = 60000


# ---------------------------------------------------------------- summary numbers

def _label(run):
    """'bll gauss_ln' / 'bll eq8 trained span2 no-head' / 'bp cnn': the method and its key options."""
    h, o = run["history"], run["options"]
    parts = [h["method"]]
    if h["method"] == "bll":
        parts.append(str(o.get("variational") or "gauss_ln"))  # None: the CLI's default recipe
        if o.get("feedback") not in (None, "closed"):
            parts.append(str(o["feedback"]))
        if o.get("span") not in (None, 1):
            parts.append(f"span{o['span']}")
        if o.get("no_head") is True:
            parts.append("no-head")
    model = run["meta"].get("model") or o.get("model")
    if model not in (None, "mlp"):
        parts.append(str(model) + (f" w{o['width']}" if _is_number(o.get("width")) else ""))
    return " ".join(parts)


def _n_train(run):
    """Training samples per epoch when the run records it (or its options pin it), else None."""
    h, o = run["history"], run["options"]
    for k in ("n_train", "train_samples"):
        if _is_number(h.get(k)) and h[k] > 0:
            return int(h[k])
    limit = o.get("limit_train")
    source = run["meta"].get("data") or h.get("data")
    if _is_finite(limit) and limit > 0 and source in ("synthetic", "fashion-mnist"):
        return int(min(limit, FASHION_MNIST_TRAIN)) if source == "fashion-mnist" else int(limit)
    return None


def _samples_per_s(run, wall):
    """From history 'samples_per_s' (a number, or one per epoch), else training samples x epochs / wall."""
    h = run["history"]
    s = h.get("samples_per_s")
    if _is_number(s) and s > 0:
        return float(s)
    if isinstance(s, list) and s and all(_is_number(v) for v in s):
        t = h["epoch_seconds"]
        if len(s) == len(t) and wall > 0:  # samples over time, not a mean of rates
            return float(sum(v * dt for v, dt in zip(s, t)) / wall)
        return float(np.mean(s))
    n = _n_train(run)
    if n is None or wall <= 0:
        return None
    return n * len(h["epochs"]) / wall


def _final_optional(h, key):
    """Last value of an optional per-epoch list (test_top3, train_acc), None when not recorded
    for every epoch (older histories, a resumed older run) or not a number."""
    v = h.get(key)
    if not isinstance(v, list) or len(v) != len(h["epochs"]) or not _is_number(v[-1]):
        return None
    return float(v[-1])


def _summary(run, name):
    h = run["history"]
    acc = h["test_acc"]
    best = int(np.nanargmax(acc)) if not all(math.isnan(a) for a in acc) else len(acc) - 1
    wall = float(sum(h["epoch_seconds"]))
    return {"run": name, "dir": run["dir"], "method": h["method"], "label": _label(run),
            "final_test_acc": float(acc[-1]), "best_test_acc": float(acc[best]),
            "best_epoch": h["epochs"][best], "epochs": len(h["epochs"]),
            "final_test_top3": _final_optional(h, "test_top3"), "final_train_acc": _final_optional(h, "train_acc"),
            "wall_seconds": wall, "samples_per_s": _samples_per_s(run, wall)}


def _run_names(dirs):
    """Base names, or the paths as given where two runs share a base name."""
    base = [os.path.basename(os.path.normpath(d)) or d for d in dirs]
    return [b if base.count(b) == 1 else os.path.normpath(d) for b, d in zip(base, dirs)]


def summary_rows(runs) -> list:
    """One dict per run (``read_run``'s dicts): run (its name), dir, method, label, final_test_acc,
    best_test_acc, final_test_top3, final_train_acc, best_epoch, epochs, wall_seconds, samples_per_s."""
    return [_summary(run, name) for run, name in zip(runs, _run_names([r["dir"] for r in runs]))]


def file_stem(name, taken):
    """A file-name-safe stem for run ``name``, distinct from those in ``taken`` (which it joins)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    out, i = stem, 2
    while out in taken:
        out, i = f"{stem}-{i}", i + 1
    taken.add(out)
    return out


# ---------------------------------------------------------------- markdown

_MD_SPECIAL = re.compile(r"([\\|`<>\[\]*])")


def printable(s):
    """Control characters (a newline in a run directory's name) as visible escapes: one line stays
    one line, so a name cannot add rows, headings or links to report.md."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def _md_cell(s):
    """Text for a table cell or a list item: printable, markdown syntax characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", printable(s))


def _md_code(s):
    """An inline code span holding ``s`` verbatim (printable): fenced by more backticks than it holds."""
    s = printable(s)
    fence = "`" * (1 + max((len(m) for m in re.findall("`+", s)), default=0))
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def markdown(rows, curves, blocks, figures_note) -> str:
    """report.md: the table of ``rows``, the notes on its columns, the runs' directories, the
    figures (``curves`` path or None, ``blocks`` {run name: path}) or ``figures_note``."""
    lines = ["# Run report", "",
             "| run | method | final test acc % | best test acc % | final test top-3 % | final train acc % "
             "| best epoch | epochs | wall time s | samples/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sps = "n/a" if r["samples_per_s"] is None else f"{r['samples_per_s']:,.0f}"
        top3, tr = (("n/a" if v is None else f"{100 * v:.2f}") for v in (r["final_test_top3"], r["final_train_acc"]))
        lines.append(f"| {_md_cell(r['run'])} | {_md_cell(r['label'])} | {100 * r['final_test_acc']:.2f} | "
                     f"{100 * r['best_test_acc']:.2f} | {top3} | {tr} | {r['best_epoch']} | {r['epochs']} | "
                     f"{r['wall_seconds']:.2f} | {sps} |")
    lines += ["",
              "Wall time: sum of the per-epoch training time (`epoch_seconds` in history.json; "
              "evaluation not included; the first epoch may include one-time Numba compilation). "
              "samples/s: the history's `samples_per_s`, or training samples x epochs / wall time when "
              "the run records its number of training samples (`--limit-train`); otherwise n/a. "
              "Top-3: the label among the 3 largest outputs on the test set; train acc: top-1 in eval "
              "mode on a fixed subset of the training set (`train_eval_samples` in history.json), "
              "after the epoch's updates.",
              "", "Runs:", ""]
    lines += [f"- {_md_cell(r['run'])}: {_md_code(r['dir'])}" for r in rows]
    lines.append("")
    if figures_note:
        lines += [figures_note, ""]
    if curves:
        lines += [f"![test accuracy and training loss per epoch]({os.path.basename(curves)})", ""]
    for name, path in blocks.items():
        lines += [f"![per-block diagnostics of {_md_cell(name)}]({os.path.basename(path)})", ""]
    return "\n".join(lines)
