"""``bll-ref`` command line: train / eval / demo (and export / verify, see exporters/)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import checkpoint, data, models
from .methods.common import evaluate, write_json_atomic


def load_data(args, image_shape):
    """Fashion-MNIST when present (or asked for), else the synthetic task; says which."""
    want = getattr(args, "data", "auto")
    if want in ("auto", "fashion-mnist") and data.fashion_mnist_available():
        d = data.load_fashion_mnist(flatten=not image_shape, limit_train=args.limit_train,
                                    limit_test=args.limit_test)
        print(f"data: Fashion-MNIST ({len(d['x_train'])} train / {len(d['x_test'])} test)")
        return d, "fashion-mnist"
    if want == "fashion-mnist":
        data.load_fashion_mnist()  # raises the FileNotFoundError with the install hint
    n_train, n_test = args.limit_train or 4000, args.limit_test or 1000
    if image_shape:
        x, y = data.synthetic_images(n_train + n_test, n_classes=10, size=28, rng=1234)
    else:
        x, y = data.synthetic_classification(n_train + n_test, n_features=784, n_classes=10, rng=1234)
    d = {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}
    why = ("as asked (--data synthetic)" if want == "synthetic" else
           "Fashion-MNIST not found (apt-get install dataset-fashion-mnist or set BLL_DATA)")
    print(f"data: synthetic {'images' if image_shape else 'clusters'} ({n_train} train / {n_test} test); {why}")
    return d, "synthetic"


def _build_model(args):
    dtype = np.dtype(args.dtype)
    if args.model == "mlp":
        sizes = tuple(int(s) for s in args.sizes.split(","))
        return models.mlp(sizes, activation_name=args.activation, rng=args.seed, dtype=dtype), False
    if args.model in ("cnn", "resnet"):
        return models.build(args.model, rng=args.seed, dtype=dtype), True
    raise SystemExit(f"bll-ref train: model {args.model!r} is not trainable on image classification "
                     "from the CLI (use examples/ for transformer and autoencoder)")


def make_method(name, blocks, args, sample_input):
    """Build the training method ``name`` from parsed CLI options."""
    if name == "bp":
        from .methods.backprop import Backprop
        return Backprop(blocks, lr=args.lr, optimizer=args.optimizer)
    if name == "fa":
        from .methods.feedback_alignment import FeedbackAlignment
        return FeedbackAlignment(blocks, lr=args.lr, optimizer=args.optimizer, rng=args.seed)
    if name == "bll":
        from .methods.bll import BLL
        return BLL(blocks, n_classes=10, variational=args.variational, feedback=args.feedback,
                   var_weight=args.var_weight, tau=args.tau, m=args.m, anneal=not args.no_anneal,
                   head=not args.no_head, head_weight=args.head_weight,
                   eq8_terms=tuple(args.eq8_terms.split(",")), span=args.span, lr=args.lr,
                   optimizer=args.optimizer, l2=args.l2, feedback_decay=args.feedback_decay,
                   use_kernels=not args.no_kernels, rng=args.seed, sample_input=sample_input)
    raise SystemExit(f"unknown method {name!r}")


def _add_train_options(p):
    p.add_argument("--method", choices=("bp", "fa", "bll"), default="bll")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet"), default="mlp")
    p.add_argument("--sizes", default="784,1024,1024,1024,10", help="MLP layer sizes")
    p.add_argument("--activation", default="leaky_relu", choices=("relu", "leaky_relu", "sigmoid", "tanh"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (checkpoint.npz, history.json)")
    g = p.add_argument_group("BLL options")
    g.add_argument("--variational", default="gauss_ln", choices=("gauss_ln", "gauss", "eq8", "bernoulli_kl", "none"))
    g.add_argument("--feedback", default="closed", choices=("closed", "trained", "twin"))
    g.add_argument("--var-weight", type=float, default=1.0)
    g.add_argument("--tau", type=float, default=2.0, help="mixing m = 1/(1 + tau epoch)")
    g.add_argument("--m", type=float, default=None, help="constant mixing m (overrides --tau)")
    g.add_argument("--no-anneal", action="store_true", help="Gaussian terms: do not weight by m")
    g.add_argument("--no-head", action="store_true", help="disable the local predictive head")
    g.add_argument("--head-weight", type=float, default=1.0)
    g.add_argument("--eq8-terms", default="forward,posterior")
    g.add_argument("--span", type=int, choices=(1, 2), default=1)
    g.add_argument("--l2", type=float, default=1.0, help="ridge strength of the closed-form feedback")
    g.add_argument("--feedback-decay", type=float, default=None)
    g.add_argument("--no-kernels", action="store_true", help="NumPy reference losses instead of Numba")


def cmd_train(args):
    from .methods.common import fit
    blocks, images = _build_model(args)
    d, source = load_data(args, images)
    if args.dtype == "float64":
        d = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in d.items()}
    method = make_method(args.method, blocks, args, d["x_train"][:8])
    out = args.out or os.path.join("runs", f"{args.method}-{args.model}-seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    print(f"training {args.method} on {args.model} for {args.epochs} epochs -> {out}")
    hist = fit(method, d, epochs=args.epochs, batch_size=args.batch_size, rng=args.seed,
               history_path=os.path.join(out, "history.json"))
    meta = {"method": args.method, "model": args.model, "data": source, "options": {k: v for k, v in vars(args).items() if k != "func"},
            "test_acc": hist["test_acc"]}
    aux = method.aux_state() if hasattr(method, "aux_state") else None
    checkpoint.save(os.path.join(out, "checkpoint.npz"), method.model, meta, aux)
    print(f"final test accuracy {100 * hist['test_acc'][-1]:.2f}%; checkpoint {out}/checkpoint.npz")
    return 0


def cmd_eval(args):
    model, meta, _ = checkpoint.load(args.checkpoint)
    images = meta.get("model") in ("cnn", "resnet")
    args.limit_train, args.limit_test = 1, args.limit_test
    d, _ = load_data(args, images)
    acc = evaluate(model, d["x_test"], d["y_test"])
    print(f"{args.checkpoint}: test accuracy {100 * acc:.2f}% ({len(d['x_test'])} examples)")
    return 0


def cmd_demo(args):
    """A short BP vs BLL run on Fashion-MNIST (all 60k/10k images) or the synthetic fallback."""
    from .methods.common import fit
    args.data = "auto"
    d, source = load_data(args, False)
    rows = []
    for method_name in ("bp", "bll"):
        ns = argparse.Namespace(**{**_defaults(), "method": method_name, "epochs": args.epochs})
        blocks = models.mlp((784, 256, 256, 256, 10), rng=0)
        method = make_method(method_name, blocks, ns, d["x_train"][:8])
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


def _defaults():
    p = argparse.ArgumentParser()
    _add_train_options(p)
    return vars(p.parse_args([]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bll-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model with BP, FA or BLL")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    p.add_argument("--limit-test", type=int, default=None)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="short BP vs BLL comparison on the embedded default")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.set_defaults(func=cmd_demo)
    from exporters.cli import add_commands  # export, verify, nir, c-header
    add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"bll-ref {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
