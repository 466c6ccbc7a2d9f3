"""BP vs feedback alignment vs BLL on a 4-block CNN, Fashion-MNIST (paper 001 Table 1, scaled down).

What it shows
-------------
The same convolutional network, split into 4 blocks, trained three ways with the same data,
initial weights, optimiser (Adam 1e-3), batch size (128) and shuffling:

* ``bp``  — end-to-end backprop (``bll_ref.methods.backprop.Backprop``);
* ``fa``  — feedback alignment, fixed random backward weights (``FeedbackAlignment``);
* ``bll`` — block-local learning with the library's default recipe, ``BLL(blocks, sample_input=...)``:
  Gaussian variational term on LN(a) with closed-form linear feedback (paper 003), annealed by
  m = 1/(1 + 2 M), plus a local predictive head per hidden block; no gradient crosses a block.

The model is ``bll_ref.models.cnn(channels=(16, 32, 64))``: three blocks of
Conv3x3(+bias) -> BatchNorm -> MaxPool2 -> ReLU (28x28 -> 14 -> 7 -> 3) and a linear classifier
block (576 -> 10), 29k parameters. Convolutions run on the CPU (im2col + BLAS for the first layer,
Winograd F(2x2, 3x3) for the others: ``Conv2d(algorithm="auto")``), so the width is chosen for 2
CPU cores: ~0.1 s per batch of 128 for each method, 0.8-1.2 min per Fashion-MNIST epoch (measured
with im2col everywhere; Winograd made it faster). (Widths (32, 64, 128) cost 2.5x as much per step
and do not fit three methods x 8 epochs into 45 min.)

For the five-method table over several seeds (BP, FA, BLL, head-only, Pred-Sim; test top-1/top-3,
train top-1, mean +- std, one JSON per run, resumable, ``--val`` for tuning), run
``examples/resnet_fashion_mnist.py --model cnn`` (same model, same defaults).

Paper reference points (ResNet-18, GPU, 001 Table 1): BP 92.7, FA 87.9, BLL 91.2 % test accuracy.
This small CNN trains for a few epochs only, so expect a few points less for every method.

Commands
--------
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python examples/cnn_fashion_mnist.py   # < 5 min
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python examples/cnn_fashion_mnist.py --full --out cnn.json

Default mode: 10 000 training / 2 000 test images, 3 epochs (~2 min on 2 cores). ``--full``: all
60 000 / 10 000 images, 8 epochs (26 min for the three methods on 2 cores). Other options:
``--methods bp,bll``, ``--epochs``, ``--limit-train``, ``--limit-test``, ``--channels 32,64,128``,
``--seed``, ``--synthetic`` (force the synthetic task), ``--quiet``. Data come from
``bll_ref.data.load``: Fashion-MNIST from ``$BLL_DATA`` (an error when set but incomplete) or
/usr/share/datasets/fashion-mnist (Debian package ``dataset-fashion-mnist``); without it the
example says so and falls back to synthetic 28x28 bar images (``bll_ref.data.synthetic_images``,
10 orientations) — those numbers say nothing about the paper.

Expected output (measured 2026-11-23 on 2 shared CPU cores, load ~5-7, OPENBLAS_NUM_THREADS=1)
------------------------------------------------------------------------------------------------
Default mode (10k / 2k images, 3 epochs; 2 min 7 s wall for all three):

    | method | final test acc % | per-epoch test acc % | seconds | s / epoch | paper (ResNet-18) |
    |---|---|---|---|---|---|
    | bp | 87.2 | 80.3 84.8 87.2 | 43 | 12.6 | 92.7 |
    | fa | 82.8 | 77.0 81.7 82.8 | 44 | 12.6 | 87.9 |
    | bll | 84.9 | 76.6 82.9 84.9 | 37 | 8.7 | 91.2 |

``--full`` (60k / 10k images, 8 epochs; 26 min for all three):

    | method | final test acc % | per-epoch test acc % | seconds | s / epoch | paper (ResNet-18) |
    |---|---|---|---|---|---|
    | bp | 90.7 | 87.8 90.2 89.4 90.6 90.0 90.8 90.6 90.7 | 633 | 71.3 | 92.7 |
    | fa | 87.3 | 84.5 87.0 87.0 87.1 86.4 88.0 87.4 87.3 | 507 | 56.9 | 87.9 |
    | bll | 89.7 | 85.2 89.0 89.0 90.0 89.7 90.7 89.5 89.7 | 431 | 46.7 | 91.2 |

BLL ends 1.0 point below BP (the paper: 1.5 below, on ResNet-18), FA 3.4 below. BLL learns more
slowly in the first epoch, so the short default mode shows a larger gap (2.3). One seed; the
per-epoch numbers move by ~0.5-1 point from epoch to epoch (constant Adam step, no decay).
Seconds depend on the machine's load (other jobs shared the cores): compare them only within
one run, and not too closely even there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from bll_ref import data, models
from bll_ref.fileio import write_json_atomic
from bll_ref.loop import fit
from bll_ref.methods import make

PAPER = {"bp": 92.7, "fa": 87.9, "bll": 91.2}  # 001 Table 1, Fashion-MNIST, ResNet-18
METHODS = ("bp", "fa", "bll")  # built by bll_ref.methods.make with their defaults
QUICK = {"limit_train": 10_000, "limit_test": 2_000, "epochs": 3}
FULL = {"limit_train": None, "limit_test": None, "epochs": 8}


def load(args, log):
    """Fashion-MNIST as (N, 1, 28, 28) float32, or the synthetic fallback (said out loud)."""
    # No limit means all of Fashion-MNIST (60 000 / 10 000), and as many synthetic images.
    d, source = data.load("synthetic" if args.synthetic else "auto", images=True,
                          limit_train=args.limit_train or 60_000, limit_test=args.limit_test or 10_000,
                          rng=args.seed, log=log)
    if source == "synthetic" and not args.synthetic:
        log("NOTE: synthetic 28x28 bar images - these numbers say nothing about the paper")
    return d, source


def table(results) -> str:
    rows = ["| method | final test acc % | per-epoch test acc % | seconds | s / epoch | paper (ResNet-18) |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        acc = r["test_acc"]
        rows.append(f"| {name} | {100 * acc[-1]:.1f} | {' '.join(f'{100 * a:.1f}' for a in acc)} | "
                    f"{r['seconds']:.0f} | {np.mean(r['epoch_seconds']):.1f} | {PAPER[name]} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    """Train the chosen methods; prints the markdown table and returns the results dict
    (``table``: the markdown, ``results[method]["test_acc"]``: accuracies in [0, 1] per epoch)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="all of Fashion-MNIST, 8 epochs (~26 min on 2 cores)")
    ap.add_argument("--methods", default="bp,fa,bll", help="comma-separated subset of bp,fa,bll")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--channels", default="16,32,64", help="conv widths of the three conv blocks")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic images even if Fashion-MNIST exists")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    preset = FULL if args.full else QUICK
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    channels = tuple(int(c) for c in args.channels.split(","))
    progress = None if args.quiet else print

    d, source = load(args, print)
    print(f"data: {source}, {len(d['x_train'])} train / {len(d['x_test'])} test images; model: cnn "
          f"channels {channels} (4 blocks); {args.epochs} epochs, batch {args.batch_size}, Adam 1e-3, seed {args.seed}")
    results = {}
    for name in names:
        blocks = models.cnn(channels=channels, rng=args.seed)  # same initial weights for every method
        method = make(name, blocks, sample_input=d["x_train"][:8], rng=args.seed)
        print(f"=== {name}")
        t0 = time.perf_counter()
        hist = fit(method, d, epochs=args.epochs, batch_size=args.batch_size, rng=args.seed, log=progress)
        results[name] = {"test_acc": hist["test_acc"], "train_loss": hist["train_loss"],
                         "epoch_seconds": hist["epoch_seconds"], "seconds": time.perf_counter() - t0}
        print(f"{name}: test accuracy {100 * hist['test_acc'][-1]:.2f}% after {args.epochs} epochs, "
              f"{results[name]['seconds']:.0f} s")
    md = table(results)
    print()
    print(md)
    payload = {"table": md, "results": results, "data": source, "n_train": len(d["x_train"]),
               "n_test": len(d["x_test"]), "model": {"name": "cnn", "channels": list(channels)},
               "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
               "paper_resnet18": PAPER, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__,
                           "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}}
    if args.out:
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
    sys.exit(0)
