"""Float vs fixed-point test accuracy of trained Fashion-MNIST MLPs and CNNs at 8, 6 and 4 bits, with and
without block-local quantisation-aware fine-tuning (issue 12.2, issue 24 item 7; bars: 8-bit default
export loses < 0.5 points, 4-bit after fine-tuning < 2 points, BP and BLL), every exported file
verified bit-exact.

    python benchmarks/fixedpoint_accuracy.py --checkpoints runs/i24/bp-relu/checkpoint.npz,runs/i24/bll-relu/checkpoint.npz
    python benchmarks/fixedpoint_accuracy.py --checkpoints runs/cnnq/bp/checkpoint.npz,runs/cnnq/bll/checkpoint.npz \
        --widths 8,4 --ft-widths 8,4,4o4 --ft-limit 10000 --limit-test 5000 --name fixedpoint_accuracy_cnn

Per checkpoint and width W, four exports (256 calibration examples from the training set, nearest
rounding, saturation), each written to HDF5, verified (integer inference rerun from the file must
reproduce its traces bit for bit) and run on the test images:

  per-tensor p99.9 oW     one weight format per tensor, activation formats clipping |x| at its 99.9th
                          percentile (unsigned after ReLUs), W-bit logits calibrated as every activation
                          (the default before issue 24)
  per-channel mse oW      per-output-channel weight formats, activation formats of least squared error
  ... oW argmax           W-bit logits calibrated for argmax (fixedpoint.calibrate.calibrate_argmax: the
                          largest frac that holds every calibration row's runner-up logit)
  ... o16                 16-bit logits (output_width=16)
  (default)               marks the one ``bll-ref export --width W`` now picks
                          (``exporters.from_checkpoint.export_defaults``)
  fine-tuned              bll-ref finetune-q for the default export of W (its weight / activation
                          calibration; 16-bit logits unless the label says WoO, narrower ones
                          calibrated for argmax; BLL checkpoints with
                          their own local losses, BP checkpoints by block reconstruction; cosine step
                          size from --ft-lr to 0) for --ft-epochs over the first --ft-limit training
                          images, exported with the formats it trained for (a BatchNorm is folded
                          into the Conv2d / Dense before it first, as finetune-q does)

Writes benchmarks/results/NAME.{json,md} (--name, default fixedpoint_accuracy).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write  # noqa: E402

from bll_ref import checkpoint, data  # noqa: E402
from bll_ref.methods import evaluate  # noqa: E402
from bll_ref.quant_finetune import (argmax_output_format, bll_options, finetune_q, fold_batchnorms,  # noqa: E402
                                    output_calibration_for)
from exporters import export, verify  # noqa: E402
from exporters.from_checkpoint import export_defaults  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIBRATIONS = {"per-tensor p99.9": dict(percentile=99.9, per_channel=False, calibration="percentile"),
                "per-channel mse": dict(percentile=99.9, per_channel=True, calibration="mse")}


def _configs(width):
    """{label: (export keywords, output calibration)} of the six exports at ``width``, and the label of
    the default."""
    out, d = {}, export_defaults(width)
    default = None
    for name, kw in CALIBRATIONS.items():
        for ow, oc in ((width, "range"), (width, "argmax"), (16, "range")):
            label = f"{name} o{ow}" + (" argmax" if oc == "argmax" else "")
            out[label] = (dict(kw, output_width=ow), oc)
            if (kw["per_channel"], kw["calibration"], ow, oc) == (d["per_channel"], d["calibration"],
                                                                  d["output_width"], "range"):
                default = label
    return out, default


def _predict(f, x):
    return np.concatenate([np.argmax(f(x[i:i + 1000]), axis=1) for i in range(0, len(x), 1000)])


def _accuracy(e, x, y, float_pred):
    """(test accuracy, argmax agreement with the float model) of the integer model of export ``e``."""
    pred = _predict(e.integer_model().infer, x)
    return float(np.mean(pred == y)), float(np.mean(pred == float_pred))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", required=True, help="comma-separated checkpoint .npz files (bll-ref train)")
    ap.add_argument("--widths", default="8,6,4", help="bits of weights and activations")
    ap.add_argument("--ft-widths", default="8,6,4,4o4",
                    help="W or WoO to fine-tune for: W-bit weights and activations, O-bit output (logits; "
                    "default O = the default export's, 16) ('' = none)")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--ft-schedule", choices=("cosine", "constant"), default="cosine",
                    help="step size over the fine-tuning (default cosine decay to 0)")
    ap.add_argument("--ft-seed", type=int, default=0, help="fine-tuning shuffling seed (default 0)")
    ap.add_argument("--ft-limit", type=int, default=None, help="fine-tune on the first N training images")
    ap.add_argument("--limit-test", type=int, default=None, help="measure on the first N test images (default all)")
    ap.add_argument("--name", default="fixedpoint_accuracy", help="results/NAME.{json,md} (default %(default)s)")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",") if w]
    ft_widths = [w for w in args.ft_widths.split(",") if w]

    def spec(w):
        width, _, out = w.partition("o")
        return int(width), int(out) if out else export_defaults(int(width))["output_width"]
    payload = {"machine": machine(), "settings": vars(args), "results": []}
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.checkpoints.split(","):
            model, meta, aux = checkpoint.load(p)
            images = meta.get("model") in ("cnn", "resnet", "resnet18")
            d, _ = data.load("fashion-mnist", images=images, limit_test=args.limit_test)
            xt, yt = d["x_test"], d["y_test"]
            calib, ycal = d["x_train"][:256], d["y_train"][:256]
            xf, yf = d["x_train"][:args.ft_limit], d["y_train"][:args.ft_limit]
            name = f"{meta.get('method', '?')} {os.path.basename(os.path.dirname(os.path.abspath(p)))}"
            float_acc = evaluate(model, xt, yt)
            float_pred = _predict(lambda v: model.forward(v, train=False), xt)
            best = {}

            def record(width, config, e, e_path, extra=None):
                rep = verify(e_path)
                acc, agree = _accuracy(e, xt, yt, float_pred)
                r = {"checkpoint": p, "name": name, "method": meta.get("method"), "width": width, "config": config,
                     "float_acc": float_acc, "fixed_acc": acc, "loss_points": 100 * (float_acc - acc), "agreement": agree,
                     "verify_ok": rep["ok"], "format_version": rep["format_version"], **(extra or {})}
                payload["results"].append(r)
                rows.append(f"| {name} | {width} | {config} | {100 * float_acc:.2f} | {100 * acc:.2f} | "
                            f"{r['loss_points']:+.2f} | {100 * agree:.2f} | {'bit-exact' if rep['ok'] else 'MISMATCH'} |")
                print(rows[-1], flush=True)
                best[(width, config)] = r

            defaults = {}
            for width in widths:
                configs, defaults[width] = _configs(width)
                for config, (kw, oc) in configs.items():
                    e_path = os.path.join(tmp, f"w{width}.h5")
                    fmt = argmax_output_format(model, calib, kw["output_width"]) if oc == "argmax" else None
                    e = export(model, e_path, calib, width=width, n_traces=32, aux=aux, meta=meta, labels=ycal,
                               out_formats=fmt, **kw)
                    record(str(width), config + (" (default)" if config == defaults[width] else ""), e, e_path,
                           {"default": config == defaults[width]})
                    best[(width, "default" if config == defaults[width] else config)] = payload["results"][-1]
            for label in ft_widths:
                width, ow = spec(label)
                d = export_defaults(width)
                ft_model, _, ft_aux = checkpoint.load(p)        # a fresh copy for every width
                ft_model, _ = fold_batchnorms(ft_model)
                objective = "bll" if meta.get("method") == "bll" else "reconstruct"
                t = time.perf_counter()
                res = finetune_q(ft_model, xf, yf, calib, width=width, epochs=args.ft_epochs, lr=args.ft_lr,
                                 objective=objective, bll_options=bll_options(meta) if objective == "bll" else None,
                                 aux=ft_aux, start_epoch=int(meta.get("options", {}).get("epochs") or 0),
                                 per_channel=d["per_channel"], calibration=d["calibration"], output_width=ow,
                                 output_calibration=output_calibration_for(ow), schedule=args.ft_schedule,
                                 rng=args.ft_seed, log=print)
                sec = time.perf_counter() - t
                e_path = os.path.join(tmp, f"ft{label}.h5")
                e = export(ft_model, e_path, calib, width=width, n_traces=32, aux=res["aux"], meta=meta, labels=ycal,
                           per_channel=d["per_channel"], calibration=d["calibration"], out_formats=res["formats"])
                record(f"{width}o{ow}", "fine-tuned", e, e_path,
                       {"objective": objective, "finetune_seconds": sec, "ft_float_acc": evaluate(ft_model, xt, yt),
                        "output_width": ow, "schedule": args.ft_schedule, "seed": args.ft_seed})
            cells = []
            for width in widths:
                dft = best[(width, "default")]
                cells.append(f"{100 * dft['fixed_acc']:.2f} ({dft['loss_points']:+.2f})")
            for label in ft_widths:
                ft = best.get((f"{spec(label)[0]}o{spec(label)[1]}", "fine-tuned"))
                cells.append(f"{100 * ft['fixed_acc']:.2f} ({ft['loss_points']:+.2f})" if ft else "-")
            summary.append(f"| {name} | {100 * float_acc:.2f} | " + " | ".join(cells) + " |")
    head = " | ".join([f"{w} default" for w in widths] + [f"{spec(w)[0]}o{spec(w)[1]} fine-tuned" for w in ft_widths])
    n_test = "10k" if args.limit_test is None else f"first {args.limit_test}"
    table = (f"Test accuracy % on the {n_test} Fashion-MNIST test images (loss in points vs float); `W default` = "
             "what `bll-ref export --width W` writes (`export_defaults`: 16-bit logits; per-tensor p99.9 from 8 bits "
             "up, per-channel MSE below); `WoO` = W-bit weights and activations, O-bit output (logits); every "
             "file verified bit-exact.\n\n"
             f"| checkpoint | float | {head} |\n|---|---|" + "---|" * (len(widths) + len(ft_widths)) + "\n"
             + "\n".join(summary)
             + "\n\nEvery export (argmax agreement = share of test images where the integer and float models pick "
             "the same class):\n\n| checkpoint | bits | export | float acc % | fixed acc % | loss (points) | "
             "argmax agreement % | verify |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    write(args.name, payload, table)


if __name__ == "__main__":
    main()
