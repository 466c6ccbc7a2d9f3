"""The report's figures, drawn with matplotlib's object API on an Agg canvas per figure (the
process-wide pyplot backend is never switched): ``curves.png`` and ``blocks-<run>.png``.

matplotlib is optional (``pip install 'bll_ref[examples]'``): :func:`import_matplotlib` returns
None without it and the report writes only report.md.
"""
from __future__ import annotations

import numpy as np

from ..fileio import atomic_open
from ..memory import check_fits
from .history import ReportError, _is_finite, _is_int
from .table import printable

__all__ = ["import_matplotlib", "curves_figure", "blocks_figure", "check_dpi", "NO_MATPLOTLIB_HINT"]

NO_MATPLOTLIB_HINT = "figures skipped: matplotlib is not installed; pip install 'bll_ref[examples]' to get them"
# (diagnostics key, panel title, y-axis label, scale to apply)
_BLOCK_PANELS = (("var_loss", "variational loss", "loss", 1.0),
                 ("head_loss", "local head loss", "loss", 1.0),
                 ("mean_abs_a", "mean |a| (forward, Eq. 3)", "mean |a|", 1.0),
                 ("mean_abs_b", "mean |b| (feedback, Eq. 4)", "mean |b|", 1.0),
                 ("between_class_fraction", "between-class variance fraction (test)", "fraction of variance", 1.0),
                 ("head_acc", "local head accuracy (test)", "accuracy (%)", 100.0))
# the largest figure (blocks-<run>.png), inches; Agg draws at most 2^16 - 1 pixels a side
_LARGEST_FIGURE, _AGG_MAX = (12, 6.5), (1 << 16) - 1


def import_matplotlib():
    """(Figure, FigureCanvasAgg) or None. The Agg canvas is attached per figure, so the report never
    switches the process-wide pyplot backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def check_dpi(dpi):
    """A resolution the figures can be drawn at ("out of memory" was the message for --dpi 100000)."""
    if not _is_int(dpi) or dpi < 1:
        raise ReportError(f"--dpi must be a whole number >= 1, got {dpi!r}")
    w, h = (round(x * dpi) for x in _LARGEST_FIGURE)
    if w > _AGG_MAX:
        raise ReportError(f"--dpi {dpi} makes the {_LARGEST_FIGURE[0]} x {_LARGEST_FIGURE[1]} inch figures "
                          f"{w:,} x {h:,} pixels; matplotlib draws at most {_AGG_MAX:,} pixels a side: use "
                          f"--dpi {_AGG_MAX // _LARGEST_FIGURE[0]} or less")
    try:
        check_fits(4 * w * h, f"--dpi {dpi} ({w:,} x {h:,} pixel figures)")
    except ValueError as e:
        raise ReportError(str(e)) from None


def _mpl_text(s):
    """A label for matplotlib: ``$`` starts mathtext (an unbalanced one is a parse error)."""
    return printable(s).replace("$", r"\$")


def _colours(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(mpl, fig, path, dpi):
    _, Canvas = mpl
    Canvas(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def curves_figure(mpl, runs, rows, path, dpi):
    """Test accuracy (%) and training loss per epoch, one colour per run, written to ``path``."""
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


def blocks_figure(mpl, run, row, path, dpi):
    """Six panels (one per diagnostic), one line per block, colour = block."""
    Figure, _ = mpl
    h = run["history"]
    pairs = [(e, d) for e, d in zip(h["epochs"], h["diagnostics"])]
    ids = sorted({b["block"] for _, d in pairs for b in d["blocks"]})
    fig = Figure(figsize=_LARGEST_FIGURE, layout="constrained")
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
