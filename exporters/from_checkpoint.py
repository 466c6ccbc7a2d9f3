"""Export a checkpoint file as ``bll-ref export`` does, from Python: the same data, the same
calibration, and for a ``finetune-q`` checkpoint the formats it was fine-tuned for, so
``export_checkpoint(path, out, width=4)`` and the command write the same file."""
from __future__ import annotations

import numpy as np

from bll_ref import checkpoint, data, models

from . import hdf5

__all__ = ["export_checkpoint", "input_kind", "training_inputs", "check_calibration"]


def check_calibration(n_calibration, n_traces):
    """ValueError unless 1 <= n_traces <= n_calibration."""
    if n_calibration < 1 or not 1 <= n_traces <= n_calibration:
        raise ValueError(f"need --calibration >= 1 and 1 <= --traces <= --calibration, got "
                         f"--calibration {n_calibration} --traces {n_traces}")


def input_kind(meta, config) -> str:
    """"image" (N, 1, 28, 28) or "vector" (N, F): what the model of a checkpoint takes."""
    return "image" if models.takes_images(meta, config) else "vector"


def training_inputs(meta, want, images, *, limit_train, limit_test):
    """The data the model was trained on (``meta['data']``) unless ``want`` says otherwise;
    synthetic data is regenerated with the training run's sizes, so the split is the same."""
    return data.training_data(meta, want, images=images, limit_train=limit_train, limit_test=limit_test)[0]


def export_checkpoint(path, out, *, width=8, rounding="nearest", overflow="saturate", percentile=99.9,
                      n_calibration=256, n_traces=16, calibration=None, per_channel=None, output_width=None,
                      data="auto", log=print):
    """Write checkpoint ``path`` as one fixed-point HDF5 file ``out`` (``hdf5.export``), calibrated on
    its first ``n_calibration`` training examples. ``calibration`` / ``per_channel`` None: what a
    finetune-q checkpoint was trained for (else percentile, per tensor); its trained activation
    formats are used when it was fine-tuned for this ``width``. Returns (ExportedModel, the float /
    fixed-point argmax agreement on the calibration examples)."""
    check_calibration(n_calibration, n_traces)
    model, meta, aux = checkpoint.load(path)
    d = training_inputs(meta, data, input_kind(meta, model.config()) == "image",
                        limit_train=n_calibration, limit_test=1)
    x, y = d["x_train"][:n_calibration], d["y_train"][:n_calibration]
    ft = meta.get("finetune_q") or {}          # a finetune-q checkpoint: export as it was trained
    if ft and ft.get("width") != width and log:
        log(f"note: the checkpoint was fine-tuned for {ft.get('width')} bits, exporting {width} "
            "(activation formats calibrated, not the fine-tuned ones)")
    e = hdf5.export(model, out, x, width=width, rounding=rounding, overflow=overflow, percentile=percentile,
                    n_traces=n_traces, aux=aux, calibration=calibration or ft.get("calibration", "percentile"),
                    per_channel=ft.get("per_channel", False) if per_channel is None else per_channel,
                    out_formats=ft.get("formats") if ft.get("width") == width else None,
                    output_width=output_width, meta=hdf5.portable_meta(meta, path), labels=y)  # no local paths
    agree = float(np.mean(np.argmax(e.integer_model().infer(x), 1) == np.argmax(model.forward(x, train=False), 1)))
    return e, agree
