"""A convolutional Gaussian autoencoder that predicts its own uncertainty (Sec. 3.3 of the BLL
paper, supplement 002 Sec. 2.1, Eq. S15-S17).

What it shows
-------------
Every image carries two channels, a mean (the pixels) and a log-variance s. During training the
log-variance channel is the same constant s* for every pixel of every image, at the input and at
the target, so the network never sees an uncertainty that varies. It is trained with the Gaussian
KL loss Eq. S15 (``bll_ref.losses.local.gaussian_kl_s15``) between the target N(mu*, e^{s*}) and
its output N(mu, e^{s}). The optimum of S15 for s is e^{s} = e^{s*} + (mu* - mu)^2, so the
network can lower the loss by predicting where its own mean will be wrong: on held-out images the
predicted variance follows the squared error it actually makes ("zero-shot" uncertainty). The
mismatch metrics S16 (mean ((mu* - mu)^2 - e^{s})^2) and S17 (mean s) are printed after every
epoch and fall during training although they are never minimised directly; ``corr`` is the
pixel-level Pearson correlation between predicted variance and true squared error.

Model (002 Sec. 2.1): encoder 2 x [Conv3x3 -> BatchNorm -> LeakyReLU -> MaxPool2], decoder
2 x [Upsample2 -> Conv3x3 (-> BatchNorm -> LeakyReLU, except at the output)]; the paper's
bottleneck has 128 channels (``--full``: widths 32, 128), the default is narrower (16, 32) to stay
within minutes on 2 cores. Mean and log-variance are two channels of one (N, 2, 28, 28) array
(002 stacks them as one 56x28 image; the channel layout keeps each pixel's mean and variance at
the same position for the convolutions). Pixels are standardised (mean 0, std 1, as 002's
MNIST pre-processing; ``bll_ref.data.load_fashion_mnist`` default).

The constant "0.2" (002: "Uncertainty inputs/targets were set to a constant of 0.2"): S15 defines
s as a log-variance and calls its channel the uncertainty channel, which read literally gives
s* = 0.2, i.e. variance e^0.2 = 1.22 -- as large as the whole pixel variance, while the main text
says the constant reflects "high confidence (low variance)". We read 0.2 as the *variance*, so
the channel holds s* = ln 0.2 = -1.61 (default). ``--target-logvar 0.2`` runs the literal reading;
it also works, but with a weaker signal (S16 is dominated by its floor e^{2 s*} = 1.49).

Training method. Sec. 3.3 introduces this network *before* block-local learning, and 002 Sec. 2.1
gives only the S15 loss and Adam (lr 1e-3): the paper trains it end to end. So does ``--method
bp`` (the default). ``bll_ref.methods.BLL`` needs class labels (its feedback and heads are label
driven), so it does not apply to this regression model. ``--method folded`` is a block-local
version of the 'folding' sketched in 001 Fig. 2D / Sec. 3.4: encoder block k and the decoder block
mirroring it form level k; level 0 is trained by S15 on the images, level k > 0 by the Gaussian
loss with unit variance (S15 with s = s* = 0, i.e. 1/2 ||z'_k - z_k||^2) to reconstruct the
detached output z_k of encoder block k. No gradient crosses a level; at test time the levels are
chained (encoder blocks, then decoder blocks). It is a stacked-autoencoder reading of Fig. 2D,
not an algorithm from the papers.

Run (2 CPU cores)::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/uncertainty_autoencoder.py          # ~1-2.5 min
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/uncertainty_autoencoder.py --method both  # x2
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/uncertainty_autoencoder.py --full   # ~15 min

Expected output of the default run (BP, 6000 training / 1000 test Fashion-MNIST images, widths
16,32, batch 32, Adam 1e-3, 5 epochs, seed 0; 8 s per epoch on an idle 2-core machine, 25 s when
it is shared)::

    epoch  S15 test     MSE      S16      S17   corr  mean e^s   time
     init    701.31  0.9924   0.9907   0.0279  0.227    1.0667
        1    124.95  0.0961   0.0854  -1.2805  0.557    0.2993   7.8s
        2    102.43  0.0754   0.0734  -1.3403  0.556    0.2790   7.6s
        3     91.77  0.0648   0.0702  -1.3361  0.545    0.2773   7.5s
        4     92.66  0.0633   0.0698  -1.3330  0.521    0.2784   8.1s
        5     84.00  0.0573   0.0622  -1.3822  0.529    0.2626   7.6s
    S16: 0.0854 after epoch 1 -> 0.0622 after epoch 5 (lower)
    S17: -1.2805 after epoch 1 -> -1.3822 after epoch 5 (lower)

What the numbers say. S16 and S17 fall, but not monotonically (epochs 3-4), and mostly because
the squared errors shrink: corr stays at ~0.52-0.56 once the mean is learnt. S16 has a floor of
about e^{2 s*} = 0.04 (the training variance is part of every prediction), S17 one of s* = -1.61.
``--method folded`` (same settings): S16 0.199 -> 0.069, S17 -1.174 -> -1.408, corr 0.18 ->
0.44, test MSE 0.087 after 5 epochs (BP: 0.057) -- the block-local version learns the
uncertainty too, more slowly. The literal reading ``--target-logvar 0.2``: S16 1.565 -> 1.530
(floor e^0.4 = 1.49), S17 0.280 -> 0.249, corr ~0.42. ``--full`` (002's 128-channel bottleneck,
all 60000 images, 3 epochs, 14 min): test MSE 0.0291 -> 0.0238 -> 0.0239, S16 0.0487 -> 0.0472
-> 0.0491, S17 -1.456 -> -1.479 -> -1.455, corr 0.51-0.52: one epoch of 60000 images already
brings S16/S17 to their floor, and later epochs move them by ~2 % either way (the last epoch
was not lower than the first there).

Besides the table, the run writes ``uncertainty_autoencoder.json`` (all metrics) and a PNG
(``uncertainty_autoencoder.png`` in ``--out-dir``) with rows: input, predicted mean, predicted
variance e^s, true squared error (mu* - mu)^2; variance and error rows are each clipped to their
own min-max range, as in 001 Fig. 2B (the shirt with the "Lee" logo, second column, gets its
highest variance on the logo, as the paper's leftmost example). Before each evaluation the
BatchNorm statistics are recomputed as a plain mean over 2000 training images (``--bn-refresh``):
the running averages jittered enough to move the test metrics by more than an epoch of training.
Without matplotlib the PNG is skipped with a note (``pip install matplotlib``, the "examples"
extra). Without Fashion-MNIST (``BLL_DATA`` or
/usr/share/datasets/fashion-mnist) the example says so and uses synthetic 28x28 bar images; a
``BLL_DATA`` that is set but does not hold Fashion-MNIST is an error (``bll_ref.data.load``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from bll_ref.data import load, resolve_source, synthetic_images
from bll_ref.layers import BatchNorm, Conv2d, LeakyReLU, MaxPool2d, Sequential, Upsample2d
from bll_ref.losses.local import gaussian_kl_s15, uncertainty_metrics_s16_s17
from bll_ref.fileio import write_json_atomic
from bll_ref.optim import make_optimizer

PNG_NAME = "uncertainty_autoencoder.png"


# ----------------------------------------------------------------------------------- data
def load_images(n_train, n_test, seed, log=print):
    """(x_train, x_test, source): standardised (N, 1, 28, 28) float32 images.

    The choice is ``bll_ref.data``'s policy (a set but incomplete ``$BLL_DATA`` is an error);
    the synthetic stand-in is this example's own: 4 bar orientations, labels unused, train and
    test drawn with seeds ``seed + 1`` and ``seed + 2`` and standardised with the train statistics."""
    source, root, why = resolve_source("auto")
    if source == "fashion-mnist":
        d, _ = load("fashion-mnist", images=True, path=root, limit_train=n_train, limit_test=n_test, log=log)
        return d["x_train"], d["x_test"], source
    log(f"note: {why}; using synthetic 28x28 bar images (bll_ref.data.synthetic_images) instead; "
        "apt-get install dataset-fashion-mnist or set BLL_DATA")
    x_train, _ = synthetic_images(n_train, size=28, rng=seed + 1)
    x_test, _ = synthetic_images(n_test, size=28, rng=seed + 2)
    mean, std = float(x_train.mean()), float(x_train.std())
    return (x_train - mean) / std, (x_test - mean) / std, "synthetic"


def with_logvar(images, s_star):
    """(N, 1, H, W) means -> (N, 2, H, W): channel 0 the mean, channel 1 the constant s*."""
    return np.concatenate([images, np.full_like(images, s_star)], axis=1)


# ----------------------------------------------------------------------------------- model
def supplement_autoencoder(widths=(16, 32), *, bn_momentum=0.1, rng=0, dtype=np.float32):
    """002 Sec. 2.1: encoder blocks [Conv3x3-BN-LeakyReLU-MaxPool2] per width, decoder blocks
    [Upsample2-Conv3x3-BN-LeakyReLU] mirroring them, the last one a plain Conv3x3 to the two
    output channels (mean, log-variance). Returns (encoder blocks, decoder blocks), decoder
    listed from the bottleneck outwards."""
    rng = np.random.default_rng(rng)
    encoder, c = [], 2
    for w in widths:
        encoder.append(Sequential(Conv2d(c, w, 3, padding=1, rng=rng, dtype=dtype),
                                  BatchNorm(w, momentum=bn_momentum, dtype=dtype), LeakyReLU(),
                                  MaxPool2d(2)))
        c = w
    decoder = []
    for w in list(widths[-2::-1]) + [2]:
        layers = [Upsample2d(2), Conv2d(c, w, 3, padding=1, rng=rng, dtype=dtype)]
        if len(decoder) < len(widths) - 1:
            layers += [BatchNorm(w, momentum=bn_momentum, dtype=dtype), LeakyReLU()]
        decoder.append(Sequential(*layers))
        c = w
    return encoder, decoder


def s15_output_grad(out, images, s_star):
    """Eq. S15 on an (N, 2, H, W) output -> (loss, dL/dout)."""
    loss, g_mu, g_s = gaussian_kl_s15(out[:, :1], out[:, 1:], images, np.full_like(images, s_star))
    return loss, np.concatenate([g_mu, g_s], axis=1)


class EndToEnd:
    """BP: one Adam over the whole encoder-decoder, loss S15 at the output (what 002 does)."""

    name = "bp"

    def __init__(self, encoder, decoder, lr):
        self.model = Sequential(*encoder, *decoder)
        self.opt = make_optimizer("adam", self.model, lr)

    def train_step(self, images, s_star):
        out = self.model.forward(with_logvar(images, s_star), train=True)
        loss, dout = s15_output_grad(out, images, s_star)
        self.model.backward(dout, need_dx=False)
        self.opt.step()
        return loss


class Folded:
    """Block-local 'folded' training (001 Fig. 2D): level k = (encoder block k, mirrored decoder
    block). Level 0 reconstructs the image (mean and log-variance) under S15; level k > 0
    reconstructs the detached encoder output z_k under S15 with unit variances (s = s* = 0), i.e.
    1/2 ||z'_k - z_k||^2. Every level's input is detached, so the levels could run in parallel."""

    name = "folded"

    def __init__(self, encoder, decoder, lr):
        self.encoder, self.decoder = encoder, decoder
        self.levels = [Sequential(e, d) for e, d in zip(encoder, decoder[::-1])]
        self.opts = [make_optimizer("adam", lv, lr) for lv in self.levels]
        self.model = Sequential(*encoder, *decoder)  # the test-time path
        self.level_losses = np.zeros(len(self.levels))

    def train_step(self, images, s_star):
        z = with_logvar(images, s_star)
        loss0 = 0.0
        for k, (enc, dec) in enumerate(zip(self.encoder, self.decoder[::-1])):
            z_next = enc.forward(z, train=True)   # also the (detached) input of level k + 1
            rec = dec.forward(z_next, train=True)
            if k == 0:
                loss, g = s15_output_grad(rec, images, s_star)
                loss0 = loss
            else:
                zeros = np.zeros_like(z)
                loss, g, _ = gaussian_kl_s15(rec, zeros, z, zeros)  # 1/2 ||z' - z||^2 per sample
            self.level_losses[k] += loss
            enc.backward(dec.backward(g), need_dx=False)
            self.opts[k].step()
            z = z_next
        return loss0


# ----------------------------------------------------------------------------------- metrics
def _batchnorms(layer):
    if isinstance(layer, BatchNorm):
        yield layer
    for child in getattr(layer, "layers", ()):
        yield from _batchnorms(child)


def refresh_bn_statistics(model, images, s_star, batch=200):
    """Recompute every BatchNorm's running mean/var as the plain average over ``images`` with
    the current weights (train-mode forwards, no update of the weights). The exponential running
    averages of training lag behind the weights and jitter with the last few batches, which made
    the held-out metrics jump by more than an epoch of training changes them."""
    bns = list(_batchnorms(model))
    if not bns or len(images) == 0:
        return
    saved = [bn.momentum for bn in bns]
    try:
        for i, start in enumerate(range(0, len(images), batch)):
            for bn in bns:
                bn.momentum = 1.0 / (i + 1)  # running = cumulative mean of the batch statistics
            model.forward(with_logvar(images[start:start + batch], s_star), train=True)
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m


def predict(model, images, s_star, batch=500):
    return np.concatenate([model.forward(with_logvar(images[i:i + batch], s_star), train=False)
                           for i in range(0, len(images), batch)])


def evaluate(model, images, s_star):
    """Test-set S15, MSE, S16, S17 and corr(e^s, (mu* - mu)^2) over all pixels."""
    out = predict(model, images, s_star)
    mu, s = out[:, :1], out[:, 1:]
    s15, _, _ = gaussian_kl_s15(mu, s, images, np.full_like(images, s_star))
    s16, s17 = uncertainty_metrics_s16_s17(mu, s, images)
    err = ((images - mu) ** 2).astype(np.float64).ravel()
    var = np.exp(np.clip(s.astype(np.float64), -50, 50)).ravel()
    corr = float(np.corrcoef(err, var)[0, 1]) if err.std() > 0 and var.std() > 0 else float("nan")
    return {"s15": float(s15), "mse": float(err.mean()), "s16": s16, "s17": s17, "corr": corr,
            "mean_var": float(var.mean())}


def save_png(path, model, images, s_star, n_show=8):
    """Rows: input, predicted mean, predicted variance, true squared error. Returns the path,
    or None (with a printed note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, skipping the PNG "
              "(pip install matplotlib, or the 'examples' extra)")
        return None
    x = images[:n_show]
    out = predict(model, x, s_star)
    rows = [("input", x[:, 0], "gray"), ("predicted mean", out[:, 0], "gray"),
            ("predicted variance e^s", np.exp(out[:, 1]), "magma"),
            ("true squared error", (x[:, 0] - out[:, 0]) ** 2, "magma")]
    fig, axes = plt.subplots(len(rows), n_show, figsize=(1.4 * n_show, 1.5 * len(rows)))
    axes = np.asarray(axes).reshape(len(rows), n_show)
    for r, (title, imgs, cmap) in enumerate(rows):
        lo, hi = float(imgs.min()), float(imgs.max())  # each row clipped to its own range
        for c in range(n_show):
            ax = axes[r, c]
            ax.imshow(imgs[c], cmap=cmap, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=7)
    fig.suptitle("Gaussian autoencoder: held-out images (001 Fig. 2B)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-train", type=int, default=6000, help="training images (default 6000)")
    p.add_argument("--n-test", type=int, default=1000, help="held-out images (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (002: 1e-3)")
    p.add_argument("--widths", default="16,32",
                   help="encoder channels per block (default 16,32; 002's bottleneck: 32,128)")
    p.add_argument("--method", choices=("bp", "folded", "both"), default="bp")
    p.add_argument("--bn-momentum", type=float, default=0.1,
                   help="BatchNorm running-statistics momentum during training (default 0.1)")
    p.add_argument("--bn-refresh", type=int, default=2000,
                   help="before each evaluation, recompute the BatchNorm statistics as the plain "
                        "mean over this many training images (0: keep the running averages)")
    p.add_argument("--target-logvar", type=float, default=math.log(0.2),
                   help="constant log-variance s* of the training inputs/targets "
                        "(default ln 0.2 = -1.61: variance 0.2; 0.2 for the literal reading)")
    p.add_argument("--full", action="store_true",
                   help="all 60000 training / 10000 test images, 002's 128-channel bottleneck "
                        "(widths 32,128), 3 epochs (~15 min on 2 cores with --method bp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=".",
                   help="where the PNG and uncertainty_autoencoder.json go (default .)")
    args = p.parse_args(argv)
    if args.full:
        args.n_train, args.n_test, args.widths, args.epochs = 60000, 10000, "32,128", 3
    try:
        args.widths = tuple(int(w) for w in str(args.widths).split(","))
    except ValueError:
        raise SystemExit(f"--widths must be comma-separated ints, got {args.widths!r}") from None
    if args.bn_refresh < 0:
        raise SystemExit(f"--bn-refresh must be >= 0, got {args.bn_refresh}")
    for name in ("epochs", "n_train", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.widths or min(args.widths) < 1:
        raise SystemExit(f"--widths must be positive, got {args.widths}")
    return args


def train(method_name, args, x_train, x_test, log=print):
    """Train one model; returns (trainer, history dict)."""
    encoder, decoder = supplement_autoencoder(args.widths, bn_momentum=args.bn_momentum, rng=args.seed)
    trainer = (EndToEnd if method_name == "bp" else Folded)(encoder, decoder, args.lr)
    s_star, rng = args.target_logvar, np.random.default_rng(args.seed)
    x_bn = x_train[:args.bn_refresh]

    def held_out():
        refresh_bn_statistics(trainer.model, x_bn, s_star)
        return evaluate(trainer.model, x_test, s_star)

    hist = {"method": method_name, "init": held_out(), "epochs": []}
    for epoch in range(1, args.epochs + 1):
        t0, losses = time.perf_counter(), []
        order = rng.permutation(len(x_train))
        for i in range(0, len(order), args.batch_size):
            loss = trainer.train_step(x_train[order[i:i + args.batch_size]], s_star)
            if not np.isfinite(loss):
                raise FloatingPointError(f"S15 loss became {loss} in epoch {epoch}; lower --lr")
            losses.append(loss)
        row = {"epoch": epoch, "train_s15": float(np.mean(losses)), "seconds": time.perf_counter() - t0}
        row.update(held_out())
        hist["epochs"].append(row)
        log(f"[{method_name}] epoch {epoch}/{args.epochs}: train S15 {row['train_s15']:.2f}, "
            f"test S16 {row['s16']:.4f}, S17 {row['s17']:.4f} ({row['seconds']:.1f}s)")
    return trainer, hist


def format_table(hist):
    lines = [f"{'epoch':>5} {'S15 test':>9} {'MSE':>7} {'S16':>8} {'S17':>8} {'corr':>6} "
             f"{'mean e^s':>9} {'time':>6}"]
    rows = [("init", hist["init"])] + [(str(r["epoch"]), r) for r in hist["epochs"]]
    for label, r in rows:
        t = f"{r['seconds']:5.1f}s" if "seconds" in r else ""
        lines.append(f"{label:>5} {r['s15']:9.2f} {r['mse']:7.4f} {r['s16']:8.4f} {r['s17']:8.4f} "
                     f"{r['corr']:6.3f} {r['mean_var']:9.4f} {t:>6}")
    return "\n".join(lines)


def main(argv=None):
    """Run the example; returns {"settings", "data", "runs": {method: history}, "png": {...}}."""
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    x_train, x_test, source = load_images(args.n_train, args.n_test, args.seed)
    s_star = args.target_logvar
    print(f"{source}: {len(x_train)} training / {len(x_test)} test images; constant log-variance "
          f"s* = {s_star:.4g} (variance {math.exp(s_star):.3g}); widths {args.widths}; "
          f"Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs")
    methods = ["bp", "folded"] if args.method == "both" else [args.method]
    result = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
              "data": source, "runs": {}, "png": {}}
    for name in methods:
        trainer, hist = train(name, args, x_train, x_test)
        result["runs"][name] = hist
        print(f"\n{name}: held-out metrics (S16, S17: 002 Eq. S16, S17; corr: predicted variance "
              "vs true squared error, per pixel)")
        print(format_table(hist))
        first, last = hist["epochs"][0], hist["epochs"][-1]
        for key in ("s16", "s17"):
            verdict = "lower" if last[key] < first[key] else "NOT lower"
            print(f"{key.upper()}: {first[key]:.4f} after epoch 1 -> {last[key]:.4f} after epoch "
                  f"{last['epoch']} ({verdict})")
        png = os.path.join(args.out_dir, PNG_NAME if len(methods) == 1 else f"uncertainty_autoencoder_{name}.png")
        if save_png(png, trainer.model, x_test, s_star):
            print(f"figure written to {png}")
            result["png"][name] = png
    write_json_atomic(os.path.join(args.out_dir, "uncertainty_autoencoder.json"), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
