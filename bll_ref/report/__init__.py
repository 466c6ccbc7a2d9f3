"""Run reports: figures and a markdown table from the run directories ``bll-ref train --out`` writes.

``bll-ref report RUN_DIR [RUN_DIR ...] --out DIR`` (:func:`make_report`) writes into DIR

* ``curves.png``        test accuracy (%) and training loss per epoch, one colour per run;
* ``blocks-<run>.png``  for every BLL run, the per-block diagnostics over epochs (var_loss,
                        head_loss, mean ``|a|``, mean ``|b|``, between-class fraction, head accuracy);
* ``report.md``         one row per run: final and best test accuracy, final test top-3 and train
                        top-1 accuracy (paper 001 Table 1's test-3 / train-1; n/a for histories
                        that lack them), epochs, wall time, samples/s.

A run directory needs ``history.json`` (written by ``bll_ref.loop.fit``); the JSON header
of ``checkpoint.npz``, when present, adds the options used for the legend. matplotlib is optional
(``pip install 'bll_ref[examples]'``): without it only ``report.md`` is written.

Modules: ``history`` (reading and checking a run directory), ``table`` (summary rows, report.md),
``figures`` (matplotlib).
"""
from __future__ import annotations

import os

from ..fileio import atomic_open, check_output
from .figures import NO_MATPLOTLIB_HINT, blocks_figure, check_dpi, curves_figure, import_matplotlib
from .history import HISTORY_VERSION, ReportError, read_run
from .table import file_stem, markdown, summary_rows

__all__ = ["make_report", "ReportError", "read_run", "HISTORY_VERSION"]


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

    Notes
    -----
    Raises ReportError (a ValueError) with one line naming the path when a run is unusable.
    """
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ReportError("no run directories given")
    check_dpi(dpi)
    log = log or (lambda *_: None)
    runs = [read_run(d) for d in run_dirs]  # all checked before anything is written
    rows = summary_rows(runs)
    _check_outputs(out_dir, run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    mpl = import_matplotlib()
    curves, blocks, note = None, {}, None
    if mpl is None:
        note = f"({NO_MATPLOTLIB_HINT}.)"
        log(NO_MATPLOTLIB_HINT)
    else:
        curves = os.path.join(out_dir, "curves.png")
        curves_figure(mpl, runs, rows, curves, dpi)
        log(f"wrote {curves}")
        taken = set()
        for run, row in zip(runs, rows):
            if run["history"]["method"] == "bll" and any(d["blocks"] for d in run["history"]["diagnostics"]):
                path = os.path.join(out_dir, f"blocks-{file_stem(row['run'], taken)}.png")
                blocks_figure(mpl, run, row, path, dpi)
                blocks[row["run"]] = path
                log(f"wrote {path}")
    md = os.path.join(out_dir, "report.md")
    with atomic_open(md, "w") as f:
        f.write(markdown(rows, curves, blocks, note))
    log(f"wrote {md}")
    return {"rows": rows, "paths": {"markdown": md, "curves": curves, "blocks": blocks}}


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
