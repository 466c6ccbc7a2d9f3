"""Run reports: figures and a markdown table from the run directories ``bll-ref train --out`` writes.

``python -m bll_ref.report RUN_DIR [RUN_DIR ...] --out DIR`` writes into DIR

* ``curves.png``        test accuracy (%) and training loss per epoch, one colour per run;
* ``blocks-<run>.png``  for every BLL run, the per-block diagnostics over epochs (var_loss,
                        head_loss, mean |a|, mean |b|, between-class fraction, head accuracy);
* ``report.md``         one row per run: final and best test accuracy, final test top-3 and train
                        top-1 accuracy (paper 001 Table 1's test-3 / train-1; n/a for histories
                        that lack them), epochs, wall time, samples/s.

A run directory needs ``history.json`` (written by ``bll_ref.methods.common.fit``); the JSON header
of ``checkpoint.npz``, when present, adds the options used for the legend. matplotlib is optional
(``pip install 'bll_ref[examples]'``): without it only ``report.md`` is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

from .fileio import atomic_open, check_output

__all__ = ["make_report", "main", "ReportError", "read_run"]

HISTORY_VERSION = 1  # newest history.json layout this reader understands (files without "version" are 1)
FASHION_MNIST_TRAIN = 60000
_REQUIRED = ("method", "epochs", "test_acc", "train_loss", "epoch_seconds")
_PER_EPOCH = ("test_acc", "train_loss", "epoch_seconds")
# (diagnostics key, panel title, y-axis label, scale to apply)
_BLOCK_PANELS = (("var_loss", "variational loss", "loss", 1.0),
                 ("head_loss", "local head loss", "loss", 1.0),
                 ("mean_abs_a", "mean |a| (forward, Eq. 3)", "mean |a|", 1.0),
                 ("mean_abs_b", "mean |b| (feedback, Eq. 4)", "mean |b|", 1.0),
                 ("between_class_fraction", "between-class variance fraction (test)", "fraction of variance", 1.0),
                 ("head_acc", "local head accuracy (test)", "accuracy (%)", 100.0))
NO_MATPLOTLIB_HINT = "figures skipped: matplotlib is not installed; pip install 'bll_ref[examples]' to get them"


class ReportError(ValueError):
    """A run directory that cannot be reported; the message is one line naming the path."""


# ---------------------------------------------------------------- reading runs

def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v):
    return _is_number(v) and math.isfinite(v)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# optional entries: scalars that must be finite numbers >= 0 where present (n_train: Infinity gave
# an OverflowError), and per-epoch lists whose items are finite numbers or null
_OPTIONAL_COUNTS = ("n_train", "train_samples", "batch_size", "train_eval_samples", "workers")
_OPTIONAL_PER_EPOCH = ("test_top3", "train_acc")


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
    lengths = {k: len(h[k]) for k in ("epochs",) + _PER_EPOCH}
    if len(set(lengths.values())) != 1:
        raise ReportError(f"{path}: per-epoch lists differ in length "
                          f"({', '.join(f'{k} {n}' for k, n in lengths.items())}); the file is damaged")
    if not h["epochs"]:
        raise ReportError(f"{path}: no finished epoch recorded; the run stopped before its first epoch ended")
    if "diagnostics" in h:
        _check_diagnostics(path, h)


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


def _short(v, n=60):
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


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


def _file_stem(name, taken):
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    out, i = stem, 2
    while out in taken:
        out, i = f"{stem}-{i}", i + 1
    taken.add(out)
    return out


# ---------------------------------------------------------------- markdown

_MD_SPECIAL = re.compile(r"([\\|`<>\[\]*])")


def _printable(s):
    """Control characters (a newline in a run directory's name) as visible escapes: one line stays
    one line, so a name cannot add rows, headings or links to report.md."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def _md_cell(s):
    """Text for a table cell or a list item: printable, markdown syntax characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", _printable(s))


def _md_code(s):
    """An inline code span holding ``s`` verbatim (printable): fenced by more backticks than it holds."""
    s = _printable(s)
    fence = "`" * (1 + max((len(m) for m in re.findall("`+", s)), default=0))
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _mpl_text(s):
    """A label for matplotlib: ``$`` starts mathtext (an unbalanced one is a parse error)."""
    return _printable(s).replace("$", r"\$")


def _markdown(rows, curves, blocks, figures_note):
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


# ---------------------------------------------------------------- figures

def _import_matplotlib():
    """(Figure, FigureCanvasAgg) or None. The Agg canvas is attached per figure, so the report never
    switches the process-wide pyplot backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _colours(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(mpl, fig, path, dpi):
    _, Canvas = mpl
    Canvas(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def _curves_figure(mpl, runs, rows, path, dpi):
    Figure, _ = mpl
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for run, row, colour in zip(runs, rows, _colours(len(runs))):
        h = run["history"]
        label = _mpl_text(f"{row['label']} ({row['run']})")
        ax_acc.plot(h["epochs"], 100 * np.asarray(h["test_acc"], float), "o-", ms=3, color=colour, label=label)
        ax_loss.plot(h["epochs"], h["train_loss"], "o-", ms=3, color=colour, label=label)
    ax_acc.set(title="test accuracy", xlabel="epoch", ylabel="test accuracy (%)")
    ax_loss.set(title="training loss (mean over the epoch)", xlabel="epoch", ylabel="loss (cross-entropy)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize="small")
    _save(mpl, fig, path, dpi)


def _blocks_figure(mpl, run, row, path, dpi):
    """Six panels (one per diagnostic), one line per block, colour = block."""
    Figure, _ = mpl
    h = run["history"]
    pairs = [(e, d) for e, d in zip(h["epochs"], h["diagnostics"])]
    ids = sorted({b["block"] for _, d in pairs for b in d["blocks"]})
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    colours = dict(zip(ids, _colours(len(ids))))
    for ax, (key, title, ylabel, scale) in zip(axes, _BLOCK_PANELS):
        plotted = False
        for k in ids:
            pts = [(e, b[key]) for e, d in pairs for b in d["blocks"]
                   if b["block"] == k and _is_finite(b.get(key))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, scale * np.asarray(ys, float), "o-", ms=3, color=colours[k], label=f"block {k}")
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, f"'{key}' not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize="small")
    fig.suptitle(_mpl_text(f"per-block diagnostics: {row['label']} ({row['run']})"))
    _save(mpl, fig, path, dpi)


# ---------------------------------------------------------------- entry points

def make_report(run_dirs, out_dir, *, log=print, dpi=100) -> dict:
    """Write curves.png, blocks-<run>.png (BLL runs) and report.md for ``run_dirs`` into ``out_dir``.

    Parameters
    ----------
    run_dirs : list of path, length >= 1
        Directories written by ``bll-ref train --out``; runs of any method mix.
    out_dir : path
        Created when missing. Every file is written atomically.
    log : callable or None
        Receives one line per written file and the hint when matplotlib is missing.
    dpi : int
        Resolution of the PNGs.

    Returns
    -------
    dict with "rows" (list, one dict per run: run, dir, method, label, final_test_acc,
    best_test_acc, final_test_top3, final_train_acc (fractions; the last two None when not
    recorded), best_epoch, epochs, wall_seconds, samples_per_s (None if unknown))
    and "paths" ({"markdown": path, "curves": path or None, "blocks": {run name: path}}).

    Raises ReportError (a ValueError) with one line naming the path when a run is unusable.
    """
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ReportError("no run directories given")
    _check_dpi(dpi)
    log = log or (lambda *_: None)
    runs = [read_run(d) for d in run_dirs]  # all checked before anything is written
    rows = [_summary(run, name) for run, name in zip(runs, _run_names(run_dirs))]
    _check_outputs(out_dir, run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    mpl = _import_matplotlib()
    curves, blocks, note = None, {}, None
    if mpl is None:
        note = f"({NO_MATPLOTLIB_HINT}.)"
        log(NO_MATPLOTLIB_HINT)
    else:
        curves = os.path.join(out_dir, "curves.png")
        _curves_figure(mpl, runs, rows, curves, dpi)
        log(f"wrote {curves}")
        taken = set()
        for run, row in zip(runs, rows):
            if run["history"]["method"] == "bll" and any(d["blocks"] for d in run["history"]["diagnostics"]):
                path = os.path.join(out_dir, f"blocks-{_file_stem(row['run'], taken)}.png")
                _blocks_figure(mpl, run, row, path, dpi)
                blocks[row["run"]] = path
                log(f"wrote {path}")
    md = os.path.join(out_dir, "report.md")
    with atomic_open(md, "w") as f:
        f.write(_markdown(rows, curves, blocks, note))
    log(f"wrote {md}")
    return {"rows": rows, "paths": {"markdown": md, "curves": curves, "blocks": blocks}}


# the largest figure (blocks-<run>.png), inches; Agg draws at most 2^16 - 1 pixels a side
_LARGEST_FIGURE, _AGG_MAX = (12, 6.5), (1 << 16) - 1


def _check_dpi(dpi):
    """A resolution the figures can be drawn at ("out of memory" was the message for --dpi 100000)."""
    if not _is_int(dpi) or dpi < 1:
        raise ReportError(f"--dpi must be a whole number >= 1, got {dpi!r}")
    w, h = (round(x * dpi) for x in _LARGEST_FIGURE)
    if w > _AGG_MAX:
        raise ReportError(f"--dpi {dpi} makes the {_LARGEST_FIGURE[0]} x {_LARGEST_FIGURE[1]} inch figures "
                          f"{w:,} x {h:,} pixels; matplotlib draws at most {_AGG_MAX:,} pixels a side: use "
                          f"--dpi {_AGG_MAX // _LARGEST_FIGURE[0]} or less")
    from .checkpoint import check_fits
    try:
        check_fits(4 * w * h, f"--dpi {dpi} ({w:,} x {h:,} pixel figures)")
    except ValueError as e:
        raise ReportError(str(e)) from None


def _check_outputs(out_dir, run_dirs):
    """Before anything is written: every report file already in ``out_dir`` must be a regular file
    (not a device, FIFO, socket or directory) and none may be a run's input (links included)."""
    if not os.path.isdir(out_dir):
        return
    inputs = [os.path.join(d, f) for d in run_dirs for f in ("history.json", "checkpoint.npz")]
    names = {"curves.png", "report.md"} | {f for f in os.listdir(out_dir)
                                           if f.startswith("blocks-") and f.endswith(".png")}
    for name in sorted(names):
        try:
            check_output(os.path.join(out_dir, name), inputs)
        except OSError as e:
            raise ReportError(e.strerror) from None
        except ValueError as e:
            raise ReportError(str(e)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bll_ref.report",
                                description="Figures and a markdown table from bll-ref run directories.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `bll-ref train --out`")
    p.add_argument("--out", required=True, help="output directory (created when missing)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG figures (default 100)")
    args = p.parse_args(argv)
    if args.dpi < 10:
        p.error(f"--dpi must be >= 10, got {args.dpi}")
    try:
        make_report(args.runs, args.out, dpi=args.dpi)
    except (ReportError, OSError) as e:
        print(f"bll-ref report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
