"""Export a checkpoint file as ``bll-ref export`` does, from Python: the same data, the same
calibration, and for a ``finetune-q`` checkpoint the formats it was fine-tuned for, so
``export_checkpoint(path, out, width=4)`` and the command write the same file."""
from __future__ import annotations

import numpy as np

from bll_ref import checkpoint, data, models
from bll_ref.quant_finetune import argmax_output_format, output_calibration_for

from . import hdf5

__all__ = ["export_checkpoint", "export_defaults", "input_kind", "training_inputs", "check_calibration"]


def export_defaults(width) -> dict:
    """What ``bll-ref export --width W`` uses when an option is not given: the settings that measured
    best (``benchmarks/fixedpoint_accuracy.py``, 10-epoch ReLU MLPs 784-1024x3-10, issue 24).

    - ``output_width`` 16 at every width: with W-bit logits the largest logit magnitude (a negative
      outlier, ~100-200) sets the format, so 8-bit logits get a step of 1 and close classes tie;
      that cost 0.39-0.48 points at 8 bits, 16-bit logits -0.04 / -0.06 (BP / BLL).
    - from 8 bits up, per-tensor weight formats and activations clipped at the 99.9th percentile
      (as good as per-channel MSE there, and one weight type per tensor for hls4ml);
    - below 8 bits, per-output-channel weight formats and MSE activation formats (at 4 bits the
      per-tensor formats left the BLL MLP at 10 %);
    - an output narrower than 16 bits (``--output-width``) calibrated for argmax
      (``quant_finetune.output_calibration_for``, ``fixedpoint.calibrate.calibrate_argmax``)."""
    fine = int(width) >= 8
    return {"output_width": 16, "calibration": "percentile" if fine else "mse", "per_channel": not fine}


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
                      output_calibration=None, data="auto", log=print):
    """Write checkpoint ``path`` as one fixed-point HDF5 file ``out`` (``hdf5.export``), calibrated on
    its first ``n_calibration`` training examples. ``calibration`` / ``per_channel`` None: what a
    finetune-q checkpoint was trained for, else :func:`export_defaults`; its trained activation
    formats are used when it was fine-tuned for this ``width``. ``output_width`` None:
    :func:`export_defaults` (16; a finetune-q checkpoint's trained output format wins);
    ``output_calibration`` None: "argmax" for outputs narrower than 16 bits, else "range". Returns
    (ExportedModel, the float / fixed-point argmax agreement on the calibration examples)."""
    check_calibration(n_calibration, n_traces)
    model, meta, aux = checkpoint.load(path)
    d = training_inputs(meta, data, input_kind(meta, model.config()) == "image",
                        limit_train=n_calibration, limit_test=1)
    x, y = d["x_train"][:n_calibration], d["y_train"][:n_calibration]
    ft = meta.get("finetune_q") or {}          # a finetune-q checkpoint: export as it was trained
    if ft and ft.get("width") != width and log:
        log(f"note: the checkpoint was fine-tuned for {ft.get('width')} bits, exporting {width} "
            "(activation formats calibrated, not the fine-tuned ones)")
    dflt = export_defaults(width)
    ow = dflt["output_width"] if output_width is None else output_width
    out_formats = ft.get("formats") if ft.get("width") == width else None
    if out_formats is None and (output_calibration or output_calibration_for(ow, overflow)) == "argmax":
        out_formats = argmax_output_format(model, x, ow, rounding=rounding, overflow=overflow)
    e = hdf5.export(model, out, x, width=width, rounding=rounding, overflow=overflow, percentile=percentile,
                    n_traces=n_traces, aux=aux, calibration=calibration or ft.get("calibration", dflt["calibration"]),
                    per_channel=ft.get("per_channel", dflt["per_channel"]) if per_channel is None else per_channel,
                    out_formats=out_formats, output_width=ow,
                    meta=hdf5.portable_meta(meta, path), labels=y)  # no local paths
    agree = float(np.mean(np.argmax(e.integer_model().infer(x), 1) == np.argmax(model.forward(x, train=False), 1)))
    return e, agree
