"""Float vs fixed-point test accuracy of trained Fashion-MNIST MLPs (issue bar: 16-bit loses
< 0.2 points, 8-bit < 1.5 points), and ``verify`` of every exported file (bit-exact traces).

    python benchmarks/fixedpoint_accuracy.py [--checkpoints runs/bench/bp-seed1.npz,...]

By default it uses every checkpoint benchmarks/accuracy_mlp.py left in runs/bench/. Each is
exported to HDF5 at 8 and 16 bits (256 calibration examples from the training set, nearest
rounding, saturation; activation formats from the max |x| and from its 99.9th percentile),
verified, and its integer model is run on the 10k test images.
Writes benchmarks/results/fixedpoint_accuracy.{json,md}.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write  # noqa: E402

from bll_ref import checkpoint, data  # noqa: E402
from bll_ref.fixedpoint import IntegerModel  # noqa: E402
from bll_ref.methods import evaluate  # noqa: E402
from exporters import export, verify  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoints", default=None, help="comma-separated .npz files")
    ap.add_argument("--widths", default="8,16")
    ap.add_argument("--percentiles", default="100,99.9",
                    help="activation calibration percentiles to compare (100 = no clipping)")
    args = ap.parse_args()
    paths = args.checkpoints.split(",") if args.checkpoints else sorted(glob.glob(os.path.join(ROOT, "runs", "bench", "*.npz")))
    if not paths:
        raise SystemExit("no checkpoints: run benchmarks/accuracy_mlp.py first (it saves runs/bench/*.npz)")
    d, _ = data.load("fashion-mnist")
    calib = d["x_train"][:256]
    rows, payload = [], {"machine": machine(), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for p in paths:
            model, meta, aux = checkpoint.load(p)
            float_acc = evaluate(model, d["x_test"], d["y_test"])
            for width, pct in ((int(w), float(q)) for w in args.widths.split(",") for q in args.percentiles.split(",")):
                h5 = os.path.join(tmp, f"w{width}.h5")
                e = export(model, h5, calib, width=width, percentile=pct, n_traces=32, aux=aux, meta=meta)
                rep = verify(h5)
                im = IntegerModel.from_records(e.records)
                pred = np.concatenate([im.infer(d["x_test"][i:i + 500]).argmax(axis=1)
                                       for i in range(0, len(d["x_test"]), 500)])
                fixed_acc = float(np.mean(pred == d["y_test"]))
                r = {"checkpoint": os.path.basename(p), "width": width, "percentile": pct, "float_acc": float_acc,
                     "fixed_acc": fixed_acc, "loss_points": 100 * (float_acc - fixed_acc),
                     "verify_ok": rep["ok"], "file_kib": rep["file_size"] / 1024}
                payload["results"].append(r)
                rows.append(f"| {r['checkpoint']} | {width} | {pct:g} | {100 * float_acc:.2f} | {100 * fixed_acc:.2f} | "
                            f"{r['loss_points']:+.2f} | {'bit-exact' if rep['ok'] else 'MISMATCH'} |")
                print(rows[-1], flush=True)
    table = ("| checkpoint | bits | act. percentile | float acc % | fixed acc % | loss (points) | verify |\n"
             "|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    write("fixedpoint_accuracy", payload, table)


if __name__ == "__main__":
    main()
