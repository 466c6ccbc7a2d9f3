"""``bll-ref`` eval, demo, report, doctor and finetune-q: parsing and printing around library calls."""
from __future__ import annotations

import os
import time

from exporters.from_checkpoint import export_defaults

from .. import checkpoint, data, models
from ..backend import device_info
from ..loop import fit
from ..methods import make
from ..methods.common import evaluate
from ..quant_finetune import finetune_checkpoint
from ..report import make_report
from .common import add_data_option, check_count

__all__ = ["add_commands", "cmd_eval", "cmd_demo", "cmd_report", "cmd_doctor", "cmd_finetune_q"]


def add_commands(sub):
    """eval, demo, report, doctor and finetune-q, added to bll-ref's sub-parsers."""
    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train")
    add_data_option(p, "test data")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="short BP vs BLL comparison on the embedded default")
    p.add_argument("--epochs", type=int, default=3, help="epochs per method")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="figures and a summary table of run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by bll-ref train")
    p.add_argument("--out", required=True, help="directory for curves.png, blocks-<run>.png, report.md")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (dots per inch)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("doctor", help="what this machine offers for --device cuda (GPU, driver, CUDA, CuPy, numba-cuda)")
    p.set_defaults(func=cmd_doctor)
    _add_finetune_q(sub)


def cmd_eval(args):
    check_count("limit-test", args.limit_test)
    model, meta, _ = checkpoint.load(args.checkpoint)
    images = models.takes_images(meta, model.config())
    d, source = data.training_data(meta, args.data, images=images, limit_train=1, limit_test=args.limit_test)
    x, y = d["x_test"][:args.limit_test], d["y_test"][:args.limit_test]
    try:
        acc = evaluate(model, x, y)
    except ValueError as e:  # the layers name the input shape they expected
        raise ValueError(f"{args.checkpoint} does not fit the {source} test data: {e}") from None
    print(f"{args.checkpoint}: test accuracy {100 * acc:.2f}% ({len(x)} {source} test examples)")
    return 0


def cmd_demo(args):
    """A short BP vs BLL run on Fashion-MNIST (all 60k/10k images) or the synthetic fallback."""
    for name in ("epochs", "limit_train", "limit_test"):
        check_count(name, getattr(args, name))
    d, source = data.load("auto", images=False, limit_train=args.limit_train, limit_test=args.limit_test,
                          log=print)
    rows = []
    for method_name in ("bp", "bll"):
        blocks = models.mlp((784, 256, 256, 256, 10), rng=0)
        method = make(method_name, blocks, sample_input=d["x_train"][:8])
        print(f"--- {method_name}: MLP 784-256-256-256-10, 4 blocks, {args.epochs} epochs")
        t = time.perf_counter()
        hist = fit(method, d, epochs=args.epochs, batch_size=128, rng=0)
        rows.append((method_name, 100 * hist["test_acc"][-1], time.perf_counter() - t))
        for b in hist["diagnostics"][-1].get("blocks", []):
            print(f"  block {b['block']}: local head accuracy {100 * b['head_acc']:.1f}%, between-class "
                  f"variance fraction {b['between_class_fraction']:.2f}, mean |a| {b['mean_abs_a']:.2f}")
    print(f"\nresults on {source} data:\n| method | test accuracy % | seconds |\n|---|---|---|")
    for name, acc, sec in rows:
        print(f"| {name} | {acc:.2f} | {sec:.1f} |")
    return 0


def cmd_report(args):
    check_count("dpi", args.dpi)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a directory for the report")
    make_report(args.run_dirs, args.out, dpi=args.dpi)
    return 0


def _add_finetune_q(sub):
    p = sub.add_parser("finetune-q", help="block-local quantisation-aware fine-tuning: every block trained on "
                       "its own with fake-quantised weights and activations (straight-through estimator)")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train (MLP or CNN; each BatchNorm is "
                   "folded into the Conv2d / Dense before it, and the fine-tuned checkpoint holds the folded model)")
    p.add_argument("--width", type=int, required=True, help="bits of the export to train for (2..16; 4, 6 or 8)")
    p.add_argument("--out", required=True, help="fine-tuned checkpoint to write (.npz)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the training set (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--objective", choices=("auto", "bll", "reconstruct"), default="auto",
                   help="auto (default): a BLL checkpoint's own local losses (heads, feedback), else block "
                   "reconstruction of the float block outputs (BP/FA checkpoints have no local heads)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_const", const=True, default=None,
                   help="per-output-channel weight formats (default: as bll-ref export, per channel below 8 "
                   "bits; recorded in the checkpoint, which bll-ref export then follows)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_const", const=False,
                   help="one weight format per tensor (default from 8 bits up)")
    p.add_argument("--calibration-method", choices=("percentile", "mse"), default=None,
                   help="activation calibration (default: as bll-ref export, mse below 8 bits, else "
                   "percentile; the formats are stored in the checkpoint and bll-ref export --width W uses them)")
    p.add_argument("--percentile", type=float, default=99.9, help="with percentile calibration (default 99.9)")
    p.add_argument("--output-width", type=int, default=None, metavar="BITS",
                   help="bits of the model's output (logits) (default 16, as bll-ref export; narrower logits are "
                   "calibrated for argmax)")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training examples that calibrate the activation formats, as export's (default 256)")
    add_data_option(p, "training data")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N training examples")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    p.set_defaults(func=cmd_finetune_q)


def cmd_finetune_q(args):
    if not 2 <= args.width <= 16:
        raise ValueError(f"--width must be in 2..16 (4, 6 or 8 for the accuracy table), got {args.width}")
    for name in ("epochs", "calibration"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    dflt = export_defaults(args.width)      # what bll-ref export does when not told: the same formats
    s = finetune_checkpoint(args.checkpoint, args.out, width=args.width, epochs=args.epochs, lr=args.lr,
                            objective=args.objective, data=args.data, n_calibration=args.calibration,
                            percentile=args.percentile, calibration=args.calibration_method or dflt["calibration"],
                            per_channel=dflt["per_channel"] if args.per_channel is None else args.per_channel,
                            output_width=args.output_width or dflt["output_width"],
                            limit_train=args.limit_train, seed=args.seed)
    print(f"integer model ({args.width} bits) test accuracy {100 * s['test_acc_before']:.2f}% -> "
          f"{100 * s['test_acc_after']:.2f}% ({s['objective']} objective, {args.epochs} epoch(s)); wrote {args.out}")
    print(f"export it with: bll-ref export {args.out} --width {args.width} (the formats it was trained for "
          "are in the checkpoint and used)")
    return 0


def cmd_doctor(args):
    """Print what the GPU stack looks like here; exit 0 when --device cuda works, else 2."""
    rows = device_info()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if rows[-1][1] == "works" else 2
