"""The on-device learning scenario of ``make firmware-learn`` (docs/on-device-learning.md): a model
trained on Fashion-MNIST is deployed to a shifted domain, sees N labelled shifted samples one at a
time on the emulated Cortex-M4 and adapts; accuracy on held-out test images before and after.

Domain shifts (on the raw pixels x in [0, 1], before the export's input normalisation):

* ``contrast``: x' = 0.4 x + 0.5, a washed-out, low-contrast camera (a bright background, the
  object's range squeezed to 40 %); the default.
* ``dark``: x' = 0.5 x, an under-exposed camera.
* ``invert``: x' = 1 - x, reversed polarity (the hardest: the first block's features no longer
  fit, which an update of the upper blocks cannot repair; see the docs for numbers).
"""
from __future__ import annotations

import os

import numpy as np

from bll_ref.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from bll_ref.fileio import write_json_atomic
from bll_ref.fixedpoint import dequantize
from bll_ref.fixedpoint.learn import plan_learning
from bll_ref.fixedpoint.learn_float import FloatTwin, fit_feedback, float_forward

from . import hdf5
from .firmware_learn import run_learn

__all__ = ["SHIFTS", "shift_pixels", "learn_scenario", "summary_line", "N_FIT"]

SHIFTS = {"contrast": lambda x: 0.4 * x + 0.5, "dark": lambda x: 0.5 * x, "invert": lambda x: 1.0 - x}
N_FIT = 2000       # unshifted training images that fit the feedback tables (the host's source domain)


def shift_pixels(x, kind) -> np.ndarray:
    """Raw pixels in [0, 1] -> the shifted domain ``kind`` (a key of SHIFTS)."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown domain shift {kind!r}; choose one of {sorted(SHIFTS)}")
    return SHIFTS[kind](np.asarray(x, np.float64))


def _normalise(x, e):
    norm = e.input_normalisation or {}
    mean, std = norm.get("mean", FASHION_MNIST_MEAN), norm.get("std", FASHION_MNIST_STD)
    return ((x - mean) / std).astype(np.float32)


def _accuracy(im, codes, y, batch=1000):
    hits = 0
    for s in range(0, len(codes), batch):
        hits += int(np.count_nonzero(im.run(codes[s:s + batch])[-1].reshape(len(codes[s:s + batch]), -1)
                                     .argmax(axis=1) == y[s:s + batch]))
    return hits / len(codes)


def learn_scenario(path, workdir, *, learn_blocks, lr_shifts, n_samples=1000, n_test=2000, shift="contrast",
                   dump_every=100, timeout=600.0, data_path=None, log=print) -> dict:
    """Run the scenario on the export at ``path`` (an MLP on Fashion-MNIST's 784 pixels).

    learn_blocks : 0-based block indices; lr_shifts : int or one per learned block.  The device sees
    the last ``n_samples`` training images, shifted; the feedback tables of learned hidden blocks
    are fitted on training images 0 .. N_FIT - 1, unshifted (the host's data); accuracies are on
    the first ``n_test`` test images.  Returns the report of ``run_learn`` plus the accuracies
    (``unshifted``, ``before``, ``after``, ``float_after``, ...) and the ``summary`` line."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown domain shift {shift!r}; choose one of {sorted(SHIFTS)}")
    if not 1 <= int(n_samples) <= 60000 - N_FIT or not 1 <= int(n_test) <= 10000:
        raise ValueError(f"--samples must be 1..{60000 - N_FIT} and --test 1..10000")
    e = hdf5.read(path)
    im0 = e.integer_model()
    if tuple(im0.records[0].shape) != (784,):
        raise ValueError(f"{path}: the scenario runs an MLP on Fashion-MNIST's 784 pixels, the export's "
                         f"input is {tuple(im0.records[0].shape)}")
    d = load_fashion_mnist(data_path, normalize=False, dtype=np.uint8, limit_test=n_test)
    px = lambda a: a.astype(np.float64) / 255                       # noqa: E731
    x_fit, y_fit = _normalise(px(d["x_train"][:N_FIT]), e), d["y_train"][:N_FIT]
    # the device's samples: the last training images, which a host run with --limit-train below
    # 60000 - n_samples never saw
    x_dev = _normalise(shift_pixels(px(d["x_train"][-n_samples:]), shift), e)
    y_dev = d["y_train"][-n_samples:]
    x_test = px(d["x_test"])
    x_test, x_test_s, y_test = _normalise(x_test, e), _normalise(shift_pixels(x_test, shift), e), d["y_test"]
    # feedback tables of hidden learned blocks: closed form on the host's unshifted data
    tr = im0.run(im0.quantize_input(x_fit))
    params = {i: (r.info["W_float"], r.info["c_float"]) for i, r in enumerate(im0.records) if r.kind == "dense"}
    acts = float_forward(im0.records, params, x_fit)
    fb_int, fb_float = {}, {}
    last = len(im0.records) - 1
    for i, r in enumerate(im0.records):
        if r.kind == "dense" and i != last and r.block in learn_blocks:
            fb_int[r.block] = fit_feedback(dequantize(tr[i], im0.formats[i]), y_fit, 10)
            fb_float[r.block] = fit_feedback(acts[i], y_fit, 10)
    im, spec = plan_learning(im0, learn_blocks, lr_shifts, feedback=fb_int)
    twin = FloatTwin(im, spec, fb_float)
    codes_dev = im.quantize_input(x_dev)
    codes_test, codes_test_s = im.quantize_input(x_test), im.quantize_input(x_test_s)
    acc = {"unshifted": _accuracy(im0, codes_test, y_test), "before": _accuracy(im0, codes_test_s, y_test),
           "float_unshifted": float(np.mean(twin.logits(x_test).argmax(1) == y_test)),
           "float_before": float(np.mean(twin.logits(x_test_s).argmax(1) == y_test))}
    log(f"on-device learning: blocks {[b + 1 for b in learn_blocks]} learn ({', '.join(r.kind for r in spec.rules)}), "
        f"shift {shift}, {n_samples} samples; building and running on QEMU mps2-an386")
    rep = run_learn(im, spec, workdir, codes_dev, y_dev, dump_every=dump_every, timeout=timeout, log=log)
    float_losses = [twin.step(x_dev[s:s + 1], int(y_dev[s])) for s in range(len(x_dev))]
    acc["after"] = _accuracy(im, codes_test_s, y_test)           # the twin's weights = the device's
    acc["float_after"] = float(np.mean(twin.logits(x_test_s).argmax(1) == y_test))
    acc["after_unshifted"] = _accuracy(im, codes_test, y_test)
    q = max(1, len(float_losses) // 10)
    il = [v for v in rep["twin_losses"] if v is not None]
    rep.update(accuracy=acc, shift=shift, n_test=int(n_test), n_fit=N_FIT,
               loss_first_tenth={"integer": float(np.mean(il[:q])) if il else None,
                                 "float": float(np.mean(float_losses[:q]))},
               loss_last_tenth={"integer": float(np.mean(il[-q:])) if il else None,
                                "float": float(np.mean(float_losses[-q:]))},
               predictions_agree=float(np.mean(im.run(codes_test_s)[-1].argmax(1) == twin.logits(x_test_s).argmax(1))))
    rep["bar_met"] = (acc["after"] - acc["before"]) >= (acc["unshifted"] - acc["before"]) / 2
    rep["summary"] = summary_line(rep)
    write_json_atomic(os.path.join(workdir, "learn_report.json"), rep)
    return rep


def summary_line(rep) -> str:
    """The one line ``make firmware-learn`` prints last (the form issue 25 fixes)."""
    a, ins = rep["accuracy"], rep.get("instructions_per_update", {}).get("mean", 0)
    return (f"on-device learning: unshifted {100 * a['unshifted']:.1f} %, shifted before {100 * a['before']:.1f} %, "
            f"after {100 * a['after']:.1f} % (float twin {100 * a['float_after']:.1f} %), {rep['steps']} samples, "
            f"bit-exact {'yes' if rep['bit_exact'] else 'no'}, RAM {rep['ram']['bll']} B "
            f"(backprop {rep['ram']['backprop']} B), instructions per update {ins}")
