"""Conv2d forward + backward by algorithm: im2col against Winograd F(2x2, 3x3), one thread, at the
3x3 stride-1 layer shapes of ``models.cnn()`` (the README CNN's and the step benchmark's) and of
``models.resnet18(width=8)``, batch 128, float32.

For each shape the two layers (same weights) are timed round-robin in bursts of 4 steps
(``common.interleaved_bursts``: warm = steps after a step of the same layer; cold = the first of a
burst), so machine drift hits both alike. Also reported: the largest difference between the two
paths' outputs and gradients, relative to the largest im2col value. This is the measurement behind
``Conv2d.WINOGRAD_MIN_CHANNELS`` (which algorithm ``algorithm="auto"`` picks).

    OPENBLAS_NUM_THREADS=1 python benchmarks/conv_algorithms.py [--repeats 10] [--batch 128]

Writes benchmarks/results/conv_algorithms.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_gflops, interleaved_bursts, machine, write  # noqa: E402

from bll_ref.layers import Conv2d  # noqa: E402

# (in channels, out channels, image size, where it occurs)
SHAPES = [
    (1, 32, 28, "models.cnn() conv 1"),
    (32, 64, 14, "models.cnn() conv 2 (step_time's conv)"),
    (64, 128, 7, "models.cnn() conv 3"),
    (1, 16, 28, "models.cnn(channels=(16, 32, 64)) conv 1"),
    (16, 32, 14, "models.cnn(channels=(16, 32, 64)) conv 2"),
    (32, 64, 7, "models.cnn(channels=(16, 32, 64)) conv 3"),
    (8, 8, 28, "resnet18(width=8) stage 1"),
    (16, 16, 14, "resnet18(width=8) stage 2"),
    (32, 32, 7, "resnet18(width=8) stage 3"),
    (64, 64, 4, "resnet18(width=8) stage 4"),
    (4, 8, 28, "below the threshold"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="rounds per shape (default 10)")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if args.repeats < 1 or args.batch < 1:
        ap.error("--repeats and --batch must be >= 1")
    rng = np.random.default_rng(0)
    rows, results = [], []
    for cin, cout, size, where in SHAPES:
        x = rng.standard_normal((args.batch, cin, size, size)).astype(np.float32)
        dy = rng.standard_normal((args.batch, cout, size, size)).astype(np.float32)
        layers = {alg: Conv2d(cin, cout, 3, padding=1, algorithm=alg, rng=0) for alg in ("im2col", "winograd")}

        def step(layer):
            def run():
                layer.forward(x)
                layer.backward(dy)
            return run
        warm, cold = interleaved_bursts({k: step(v) for k, v in layers.items()}, repeats=args.repeats)
        ref = layers["im2col"]
        y_ref, dx_ref = ref.forward(x), ref.backward(dy)
        wino = layers["winograd"]
        y, dx = wino.forward(x), wino.backward(dy)
        diff = max(float(np.abs(a - b).max() / np.abs(b).max())
                   for a, b in ((y, y_ref), (dx, dx_ref), (wino.grads["W"], ref.grads["W"])))
        auto = Conv2d(cin, cout, 3, padding=1).winograd
        r = {"in": cin, "out": cout, "size": size, "where": where, "warm_s": warm, "cold_s": cold,
             "winograd_over_im2col": warm["winograd"] / warm["im2col"], "max_rel_diff": diff,
             "auto": "winograd" if auto else "im2col"}
        results.append(r)
        rows.append(f"| {cin} -> {cout}, {size}x{size} | {where} | {1e3 * warm['im2col']:.2f} | "
                    f"{1e3 * warm['winograd']:.2f} | **{r['winograd_over_im2col']:.2f}** | "
                    f"{cold['winograd'] / cold['im2col']:.2f} | {diff:.1e} | {r['auto']} |")
        print(rows[-1], flush=True)
    md = [f"Conv2d 3x3, padding 1, forward + backward, batch {args.batch}, float32, one thread; warm "
          f"medians of {args.repeats} rounds x 3 steps (cold: the first step of each burst of 4). "
          f"float32 1024^3 GEMM {gemm_gflops():.0f} GFLOP/s. Conv2d.WINOGRAD_MIN_CHANNELS = "
          f"{Conv2d.WINOGRAD_MIN_CHANNELS}.", "",
          "| channels, size | where | im2col ms | Winograd ms | Winograd / im2col | cold | max rel. diff | auto picks |",
          "|---|---|---|---|---|---|---|---|", *rows]
    write("conv_algorithms", {"machine": machine(), "batch": args.batch, "repeats": args.repeats,
                              "threads": os.environ.get("OPENBLAS_NUM_THREADS"), "results": results}, "\n".join(md))


if __name__ == "__main__":
    main()
