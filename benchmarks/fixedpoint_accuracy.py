"""Float vs fixed-point test accuracy of trained Fashion-MNIST MLPs and CNNs at 8, 6 and 4 bits, with and
without block-local quantisation-aware fine-tuning (issue 12.2; bar: 8-bit loss < 0.5 points,
4-bit after fine-tuning < 2 points, BP and BLL), every exported file verified bit-exact.

    python benchmarks/fixedpoint_accuracy.py --checkpoints runs/h12b/bp-relu/checkpoint.npz,runs/h12b/bll-relu/checkpoint.npz
    python benchmarks/fixedpoint_accuracy.py --checkpoints runs/cnnq/bp/checkpoint.npz --widths 8,4 \
        --ft-widths 8,4 --ft-limit 10000 --limit-test 5000 --name fixedpoint_accuracy_cnn

Per checkpoint and width, three exports (256 calibration examples from the training set, nearest
rounding, saturation), each written to HDF5, verified (integer inference rerun from the file must
reproduce its traces bit for bit) and run on the 10k test images:

  per-tensor p99.9   the export defaults: one weight format per tensor, activation formats
                     clipping |x| at its 99.9th percentile (unsigned after ReLUs)
  per-channel mse    per-output-channel weight formats, activation formats of least squared error
  fine-tuned         bll-ref finetune-q (per-channel, mse; BLL checkpoints with their own local
                     losses, BP checkpoints by block reconstruction) for --ft-epochs over the
                     first --ft-limit training images, exported with the formats it trained for
                     (a BatchNorm is folded into the Conv2d / Dense before it first, as finetune-q does)

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
from bll_ref.quant_finetune import bll_options, finetune_q, fold_batchnorms  # noqa: E402
from exporters import export, verify  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"per-tensor p99.9": dict(percentile=99.9), "per-channel mse": dict(per_channel=True, calibration="mse")}


def _accuracy(e, x, y):
    """Test accuracy of the integer model of export ``e``."""
    im = e.integer_model()
    pred = np.concatenate([im.infer(x[i:i + 1000]).argmax(axis=1) for i in range(0, len(x), 1000)])
    return float(np.mean(pred == y))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", required=True, help="comma-separated checkpoint .npz files (bll-ref train)")
    ap.add_argument("--widths", default="8,6,4,4o16",
                    help="W or WoO: W-bit weights and activations, O-bit output (logits; default O = W)")
    ap.add_argument("--ft-widths", default="8,6,4,4o16", help="the same, to fine-tune for ('' = none)")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--ft-limit", type=int, default=None, help="fine-tune on the first N training images")
    ap.add_argument("--limit-test", type=int, default=None, help="measure on the first N test images (default all)")
    ap.add_argument("--name", default="fixedpoint_accuracy", help="results/NAME.{json,md} (default %(default)s)")
    args = ap.parse_args()
    widths = [w for w in args.widths.split(",") if w]
    ft_widths = [w for w in args.ft_widths.split(",") if w]

    def spec(w):
        width, _, out = w.partition("o")
        return int(width), int(out) if out else None
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
            best = {}

            def record(width, config, e, e_path, extra=None):
                rep = verify(e_path)
                acc = _accuracy(e, xt, yt)
                r = {"checkpoint": p, "name": name, "method": meta.get("method"), "width": width, "config": config,
                     "float_acc": float_acc, "fixed_acc": acc, "loss_points": 100 * (float_acc - acc),
                     "verify_ok": rep["ok"], "format_version": rep["format_version"], **(extra or {})}
                payload["results"].append(r)
                rows.append(f"| {name} | {width} | {config} | {100 * float_acc:.2f} | {100 * acc:.2f} | "
                            f"{r['loss_points']:+.2f} | {'bit-exact' if rep['ok'] else 'MISMATCH'} |")
                print(rows[-1], flush=True)
                best[(width, config)] = r

            for label in widths:
                width, ow = spec(label)
                for config, kw in CONFIGS.items():
                    e_path = os.path.join(tmp, f"w{label}.h5")
                    e = export(model, e_path, calib, width=width, n_traces=32, aux=aux, meta=meta, labels=ycal,
                               output_width=ow, **kw)
                    record(label, config, e, e_path)
            for label in ft_widths:
                width, ow = spec(label)
                ft_model, _, ft_aux = checkpoint.load(p)        # a fresh copy for every width
                ft_model, _ = fold_batchnorms(ft_model)
                objective = "bll" if meta.get("method") == "bll" else "reconstruct"
                t = time.perf_counter()
                res = finetune_q(ft_model, xf, yf, calib, width=width, epochs=args.ft_epochs, lr=args.ft_lr,
                                 objective=objective, bll_options=bll_options(meta) if objective == "bll" else None,
                                 aux=ft_aux, start_epoch=int(meta.get("options", {}).get("epochs") or 0),
                                 per_channel=True, calibration="mse", output_width=ow, log=print)
                sec = time.perf_counter() - t
                e_path = os.path.join(tmp, f"ft{label}.h5")
                e = export(ft_model, e_path, calib, width=width, n_traces=32, aux=res["aux"], meta=meta, labels=ycal,
                           per_channel=True, calibration="mse", out_formats=res["formats"])
                record(label, "fine-tuned", e, e_path, {"objective": objective, "finetune_seconds": sec,
                                                "ft_float_acc": evaluate(ft_model, xt, yt)})
            cells = []
            for label in widths:
                plain = max(best[(label, c)]["fixed_acc"] for c in CONFIGS)
                ft = best.get((label, "fine-tuned"))
                cells.append(f"{100 * plain:.2f} ({100 * (float_acc - plain):+.2f})")
                cells.append(f"{100 * ft['fixed_acc']:.2f} ({ft['loss_points']:+.2f})" if ft else "-")
            summary.append(f"| {name} | {100 * float_acc:.2f} | " + " | ".join(cells) + " |")
    head = " | ".join(f"{w} | {w} fine-tuned" for w in widths)
    n_test = "10k" if args.limit_test is None else f"first {args.limit_test}"
    table = (f"Test accuracy % on the {n_test} Fashion-MNIST test images (loss in points vs float); plain = the "
             "better of the two export configurations below; `4o16` = 4-bit weights and activations, 16-bit "
             "output (logits); every file verified bit-exact.\n\n"
             f"| checkpoint | float | {head} |\n|---|---|" + "---|" * (2 * len(widths)) + "\n"
             + "\n".join(summary)
             + "\n\nEvery export:\n\n| checkpoint | bits | export | float acc % | fixed acc % | loss (points) | verify |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    write(args.name, payload, table)


if __name__ == "__main__":
    main()
