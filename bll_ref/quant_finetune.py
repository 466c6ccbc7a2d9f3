"""Block-local quantisation-aware fine-tuning: each block trained on its own, with fake-quantised
weights and activations, so that the integer model made by ``bll-ref export --width W`` loses less.

The fake-quantised network is the float model with the integer model's rounding put back in:

    input        x  -> Q(x, input_fmt)
    Dense/Conv2d W  -> Q(W, w_fmt) (per tensor, or per output channel), c -> Q(c, acc_frac),
                 y  = x W + c, then Q(y, out_fmt) (saturating) -- in the block's activation
                      when one follows (so the local losses see the unrounded pre-activation a)
    ReLU, MaxPool2d, Flatten: exact on the quantisation grid; LeakyReLU: the integer slope code
    and its rounding (``fixedpoint.records.LeakyReLU``)

where Q(v, fmt) = dequantize(quantize(v, fmt)).  Weight formats are those ``compile_integer``
picks for the current weights (recomputed at every step); activation formats are calibrated once
on the calibration batch before fine-tuning and kept, and the export uses them
(``meta["finetune_q"]["formats"]``, ``compile_integer(..., out_formats=)``).  So in float64 the
forward pass equals the integer model's trace bit for bit (a test pins it); in float32 sums may
round differently at rare ties.

Gradients pass Q by the straight-through estimator (Bengio et al. 2013): dQ(v)/dv = 1 where v
lies inside the format's range, 0 where it saturates (clipped STE); dQ(W)/dW = 1 (weight formats
fit every weight).

Objectives, each block on its own (no gradient crosses a block boundary):

``bll``
    the checkpoint's BLL local losses (Eq. 7 / S8 variational term against the closed-form
    feedback, local predictive head; ``bll_ref.methods.BLL``) with the heads and feedback read
    from the checkpoint's aux arrays; the last block: cross-entropy.
``reconstruct``
    for BP / FA checkpoints, which have no local heads: block k learns to reproduce the float
    block's output from the quantised input, L_k = ||h_k^q - h_k^float||^2 / (2 N D) (block
    reconstruction, as in BRECQ, Li et al. 2021); the last block: cross-entropy.  Random fresh
    heads would first have to be trained and would pull the blocks away from what the next block
    expects; the float block is a target that every block already agrees with.

BatchNorm: a BatchNorm right after a Dense / Conv2d in the same block is folded into it first
(:func:`fold_batchnorms`, eval-mode running statistics, the exporter's own folding
``fixedpoint.walk.fold_batchnorm``), so fine-tuning trains, and the checkpoint holds, the layer the
integer model computes; the block outputs, and so the BLL heads and feedback, are unchanged.
"""
from __future__ import annotations

import os

import numpy as np

from . import layers as L
from .fixedpoint import compile_integer
from .fixedpoint.calibrate import calibrate_weight, calibrate_weight_per_channel
from .fixedpoint.qformat import round_float
from .fixedpoint.walk import Affine, walk
from .layers.base import Layer, layer_from_config, load_state_dict, state_dict
from .losses.output import softmax_cross_entropy
from .optim import make_optimizer

__all__ = ["fake_quant", "fake_quant_model", "finetune_q", "fold_batchnorms", "quantized_loss", "OBJECTIVES"]

OBJECTIVES = ("bll", "reconstruct")


def _fq(v, frac, lo, hi, rounding):
    """Q(v) at ``frac`` fractional bits (scalar or broadcastable array), saturated to codes
    [lo, hi], in v's float dtype: the scaling by 2**frac is exact and ``round_float`` rounds
    exactly, so this equals dequantize(quantize(v)) (a test pins it) at a fraction of its cost."""
    scale = np.ldexp(np.ones((), v.dtype), frac).astype(v.dtype, copy=False)
    r = round_float(v * scale, rounding)
    return np.clip(r, lo, hi, out=r) / scale


def fake_quant(x, fmt):
    """(Q(x), mask): x rounded to ``fmt``'s grid and saturated, in x's dtype, and the STE mask
    (True where x lies inside the format's range [min_code, max_code] * 2**-frac)."""
    x = np.asarray(x)
    if fmt.overflow != "saturate":
        raise ValueError("fake-quantised training needs overflow='saturate' (a wrapped value has no gradient)")
    xq = _fq(x, fmt.frac, fmt.min_code, fmt.max_code, fmt.rounding).astype(x.dtype, copy=False)
    lo, hi = np.ldexp(float(fmt.min_code), -fmt.frac), np.ldexp(float(fmt.max_code), -fmt.frac)
    return xq, (x >= lo) & (x <= hi)


def _fq_weights(W, out_axis, width, rounding, per_channel):
    """Q(W) with the weight format(s) compile_integer would choose; returns (Wq in W's dtype,
    w_frac (out,))."""
    W = np.asarray(W)
    if per_channel:
        fmt, fracs = calibrate_weight_per_channel(W, width, out_axis, rounding=rounding)
    else:
        fmt = calibrate_weight(W, width, rounding=rounding)
        fracs = np.full(W.shape[out_axis], fmt.frac, dtype=np.int64)
    shape = [1] * W.ndim
    shape[out_axis] = -1
    return _fq(W, fracs.reshape(shape), fmt.min_code, fmt.max_code, rounding), fracs


class _FQAffine(Layer):
    """A Dense / Conv2d with fake-quantised weights and bias, and (unless its block's activation
    does it) fake-quantised output.  Shares the wrapped layer's params and grads, so optimisers
    made for it update the float layer; the quantised values live in the layer's arrays only
    between forward(train=True) and backward."""

    takes_need_dx = True

    def __init__(self, layer, width, rounding, per_channel):
        self._cache = None                          # params / grads / buffers are the layer's
        self.layer, self.width, self.rounding, self.per_channel = layer, width, rounding, per_channel
        self.out_axis = 1 if isinstance(layer, L.Dense) else 0
        self.in_fmt = self.out_fmt = None          # set by set_formats
        self._saved = None
        self._mask = None

    params = property(lambda self: self.layer.params)
    grads = property(lambda self: self.layer.grads)
    buffers = property(lambda self: self.layer.buffers)

    def zero_grads(self):
        self.layer.zero_grads()

    def set_formats(self, in_fmt, out_fmt):
        """Input format (for the bias's acc_frac) and output format (None: the activation after
        this layer quantises)."""
        self.in_fmt, self.out_fmt = in_fmt, out_fmt

    def _restore(self):
        if self._saved is not None:
            for k, v in self._saved.items():
                self.layer.params[k][...] = v
            self._saved = None

    def quantized_params(self):
        """{"W": Q(W), "c": Q(c at in_frac + w_frac)} as float64 (c per channel when per-channel)."""
        p = self.layer.params
        Wq, fracs = _fq_weights(p["W"], self.out_axis, self.width, self.rounding, self.per_channel)
        out = {"W": Wq}
        if "c" in p:                               # as compile_integer: round(c * 2**acc_frac)
            acc = self.in_fmt.frac + fracs
            out["c"] = np.ldexp(round_float(np.ldexp(np.asarray(p["c"], np.float64), acc), self.rounding), -acc)
        return out

    def forward(self, x, train=True):
        self._restore()
        saved = {k: v.copy() for k, v in self.layer.params.items()}
        for k, v in self.quantized_params().items():
            self.layer.params[k][...] = v
        self._saved = saved                  # backward uses Q(W) for dx, then restores
        try:
            y = self.layer.forward(x, train=train)
        finally:
            if not train:
                self._restore()
        self._mask = None
        if self.out_fmt is not None:
            y, mask = fake_quant(y, self.out_fmt)
            if train:
                self._mask = mask
        return y

    def backward(self, dy, need_dx=True):
        if self._saved is None:
            raise RuntimeError("fake-quantised layer: backward needs a forward(x, train=True) first")
        if self._mask is not None:
            dy = dy * self._mask                    # clipped STE
        try:
            return self.layer.backward(dy, need_dx=need_dx)
        finally:
            self._restore()                         # the optimiser steps the float weights

    def config(self):
        return self.layer.config()


class _FQReLU(L.ReLU):
    """ReLU whose input is first fake-quantised to ``in_fmt`` (the Dense/Conv2d's output format)
    when ``in_fmt`` is set: y = Q(relu(x)) = relu(Q(x)) as in the integer model."""

    def __init__(self, in_fmt=None):
        super().__init__()
        self.in_fmt = in_fmt

    def forward(self, x, train=True):
        keep = np.ones(x.shape, bool)
        if self.in_fmt is not None:
            x, keep = fake_quant(x, self.in_fmt)
        y = np.maximum(x, 0).astype(x.dtype, copy=False)
        if train:
            self._cache = keep & (x > 0)
        return y

    def backward(self, dy):
        mask = self._cached()
        return (self._check_dy(dy, mask.shape) * mask).astype(dy.dtype, copy=False)


class _FQLeakyReLU(L.LeakyReLU):
    """LeakyReLU in the integer model's arithmetic: y = x if x > 0 else Q(x * slope_q, fmt), with
    slope_q = slope_code * 2**-slope_frac; x first fake-quantised to ``fmt`` when ``quant_in``."""

    def __init__(self, slope, fmt=None, slope_q=None, quant_in=False):
        super().__init__(slope)
        self.fmt, self.slope_q, self.quant_in = fmt, slope_q, quant_in

    def forward(self, x, train=True):
        keep = np.ones(x.shape, bool)
        if self.quant_in:
            x, keep = fake_quant(x, self.fmt)
        pos = x > 0
        neg = fake_quant(x * x.dtype.type(self.slope_q), self.fmt)[0]
        y = np.where(pos, x, neg).astype(x.dtype, copy=False)
        if train:
            self._cache = (pos, keep)
        return y

    def backward(self, dy):
        pos, keep = self._cached()
        self._check_dy(dy, pos.shape)
        return (np.where(pos, dy, dy * dy.dtype.type(self.slope_q)) * keep).astype(dy.dtype, copy=False)


class FakeQuantModel:
    """The fake-quantised blocks of a float model (``blocks``: list of Sequential sharing the float
    model's parameters) and what sets their formats from an :class:`IntegerModel`."""

    def __init__(self, model, width, rounding="nearest", per_channel=False):
        self.width, self.rounding, self.per_channel = width, rounding, per_channel
        self.blocks, self._slots = [], []       # slots: (record name, wrapper, role)
        for k, block in enumerate(model):
            layers = list(block.layers) if isinstance(block, L.Sequential) else [block]
            self.blocks.append(L.Sequential(*self._wrap_block(k, layers)))
        self.input_fmt = None

    def _wrap_block(self, k, layers):
        out, pending = [], None            # pending: an affine whose activation quantises its output
        last = len(layers) - 1
        for j, layer in enumerate(layers):
            name = f"{k}.{j}"
            if isinstance(layer, (L.Dense, L.Conv2d)):
                if j < last and isinstance(layers[j + 1], L.BatchNorm):
                    raise ValueError(f"finetune-q: layer {name} is followed by a BatchNorm; fold it first "
                                     "with quant_finetune.fold_batchnorms(model) (bll-ref finetune-q does)")
                w = _FQAffine(layer, self.width, self.rounding, self.per_channel)
                rest = layers[j + 1:]
                defer = (bool(rest) and isinstance(rest[-1], (L.ReLU, L.LeakyReLU))
                         and all(isinstance(r, (L.MaxPool2d, L.Flatten)) for r in rest[:-1]))
                self._slots.append((name, w, "affine_deferred" if defer else "affine"))
                pending = name if defer else None
                out.append(w)
            elif isinstance(layer, L.LeakyReLU):
                w = _FQLeakyReLU(layer.slope, quant_in=pending is not None and j == last)
                self._slots.append((name, w, ("leaky", pending if j == last else None)))
                out.append(w)
            elif isinstance(layer, L.ReLU):
                w = _FQReLU()
                self._slots.append((name, w, ("relu", pending if j == last else None)))
                out.append(w)
            elif isinstance(layer, (L.MaxPool2d, L.Flatten)):
                out.append(layer)          # exact on the quantisation grid (max, reshape)
            else:
                raise ValueError(f"finetune-q: layer {name} ({type(layer).__name__}) has no fake-quantised "
                                 "version; supported: Dense, Conv2d, ReLU, LeakyReLU, MaxPool2d, Flatten")
        return out

    def set_formats(self, im):
        """Activation formats (and the input formats of the weights' biases) from ``im``, an
        IntegerModel compiled from the float model these blocks share."""
        by_name = {r.name: (i, r) for i, r in enumerate(im.records)}
        self.input_fmt = im.input_fmt
        for name, w, role in self._slots:
            if name not in by_name:
                raise ValueError(f"finetune-q: no integer record named {name!r}; the model and its "
                                 "integer compilation disagree")
            i, rec = by_name[name]
            if role in ("affine", "affine_deferred"):
                w.set_formats(im.formats[rec.inputs[0]], None if role == "affine_deferred" else rec.out_fmt)
            elif role[0] == "relu":
                w.in_fmt = by_name[role[1]][1].out_fmt if role[1] else None
            else:
                w.fmt = rec.out_fmt
                w.slope_q = float(np.ldexp(float(rec.slope_code), -rec.slope_frac))

    def quantize_input(self, x):
        return fake_quant(x, self.input_fmt)[0]

    def forward(self, x):
        """Eval forward of every block on raw input x; returns the list of block outputs."""
        h, outs = self.quantize_input(x), []
        for b in self.blocks:
            h = b.forward(h, train=False)
            outs.append(h)
        return outs


def fake_quant_model(model, im, *, per_channel=False) -> FakeQuantModel:
    """The fake-quantised twin of ``model`` (Sequential of blocks) with the formats of ``im``
    (``compile_integer(model, ..., per_channel=per_channel)``; width and rounding are im's)."""
    fq = FakeQuantModel(list(model), im.input_fmt.width, im.input_fmt.rounding, per_channel)
    fq.set_formats(im)
    return fq


def quantized_loss(im, x, y, batch=2000) -> tuple:
    """(mean cross-entropy, accuracy) of the integer model's dequantised logits on (x, y)."""
    losses, correct = [], 0
    for i in range(0, len(x), batch):
        logits = im.infer(x[i:i + batch])
        losses.append(softmax_cross_entropy(logits, y[i:i + batch])[0] * len(logits))
        correct += int(np.sum(np.argmax(logits, 1) == y[i:i + batch]))
    return float(np.sum(losses) / len(x)), correct / len(x)


def _copy_model(model):
    twin = L.layer_from_config(model.config())
    load_state_dict(twin, state_dict(model))
    return twin


def fold_batchnorms(model) -> tuple:
    """A copy of ``model`` with every BatchNorm that follows a Dense / Conv2d in the same
    Sequential folded into it: W' = W s, c' = (c - running_mean) s + beta, s = gamma /
    sqrt(running_var + eps) (eval mode), computed by the exporter's walk
    (``fixedpoint.walk.fold_batchnorm``, float64) and stored in the layer's dtype; the layer
    gains a bias when it had none.  ``model`` itself is unchanged.

    Parameters
    ----------
    model : Sequential of blocks (or list of blocks)

    Returns
    -------
    (folded Sequential, names) : names of the folds as the exporter's records had them
        ("0.0+0.1" = layer 0.0 with BatchNorm 0.1 folded), [] when there was nothing to fold.
        A Residual is copied as it is (fake-quantised training refuses it later).
    """
    twin = _copy_model(model if isinstance(model, L.Sequential) else L.Sequential(*model))
    steps = [s for s in walk(twin) if isinstance(s, Affine) and s.bn is not None]
    folds = {id(s.layer): s for s in steps}

    def fold(seq):
        kept, j = [], 0
        while j < len(seq.layers):
            layer = seq.layers[j]
            if isinstance(layer, L.Sequential):
                fold(layer)
            elif id(layer) in folds:
                s = folds[id(layer)]
                # the walk flattens nested Sequentials, so it may pair a Dense / Conv2d closing one
                # block with a BatchNorm opening the next; folding that would change the block's
                # output, which the next block and the BLL heads expect
                if j + 1 == len(seq.layers) or seq.layers[j + 1] is not s.bn:
                    raise ValueError(f"finetune-q: {s.name}: the BatchNorm after the last layer of a Sequential "
                                     "(block) opens the next one; only a BatchNorm right after a Dense / Conv2d "
                                     "in the same Sequential can be folded")
                cfg = {**layer.config(), "bias": True}
                new = layer_from_config(cfg)
                new.params["W"][...] = s.W
                new.params["c"][...] = s.c
                kept.append(new)
                j += 2
                continue
            kept.append(layer)
            j += 1
        seq.layers = kept

    fold(twin)
    return twin, [s.name for s in steps]


def _load_bll_aux(method, aux):
    """Heads and feedback of a fresh BLL method from a checkpoint's aux arrays."""
    for learner in method.learners[:-1]:
        k = learner.k
        if learner.head is not None:
            for n, p in learner.head.params.items():
                key = f"head{k}/{n}"
                if key not in aux or aux[key].shape != p.shape:
                    raise ValueError(f"finetune-q: the checkpoint has no head weights {key} of shape {p.shape}; "
                                     "use --objective reconstruct")
                p[...] = aux[key]
        if learner.feedback is not None:
            want = learner.feedback.state_dict()
            got = {n: aux.get(f"feedback{k}/{n}") for n in want}
            if any(v is None for v in got.values()):
                raise ValueError(f"finetune-q: the checkpoint lacks feedback{k}/ arrays; use --objective reconstruct")
            learner.feedback.load_state_dict(got)


def finetune_q(model, x, y, calibration_x, *, width, epochs=1, lr=3e-4, batch_size=128, objective="reconstruct",
               bll_options=None, aux=None, start_epoch=0, rounding="nearest", percentile=99.9,
               calibration="percentile", per_channel=False, output_width=None, rng=0, log=print):
    """Fine-tune ``model`` (Sequential of blocks, float weights updated in place) block by block
    with fake-quantised weights and activations.

    Parameters
    ----------
    model : Sequential of blocks (Dense / Conv2d, ReLU / LeakyReLU, MaxPool2d, Flatten); a BatchNorm
        must be folded first (:func:`fold_batchnorms`)
    x, y : training inputs (N, ...) float and labels (N,) int
    calibration_x : the batch that calibrates the activation formats, as ``bll-ref export`` will
        (its first ``--calibration`` training examples)
    width, rounding, percentile, calibration, per_channel, output_width : the export settings to
        train for (see :func:`~bll_ref.fixedpoint.compile_integer`)
    epochs, lr, batch_size : Adam steps over shuffled x
    objective : "bll" (needs ``bll_options`` and the checkpoint ``aux``) or "reconstruct"
    bll_options : BLL keywords of the checkpoint's training run (``bll_ref.cli.method_options``)
    start_epoch : epochs the checkpoint was trained for (sets BLL's mixing m = 1 / (1 + tau epoch))

    Returns
    -------
    dict with history (per epoch: train loss), aux (updated BLL heads and feedback, or ``aux``
    unchanged), formats ({record name: QFormat}: the activation formats trained for, to give
    ``compile_integer(..., out_formats=)`` / ``bll-ref export``)
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"finetune-q: objective must be one of {OBJECTIVES}, got {objective!r}")
    if not 2 <= int(width) <= 16:
        raise ValueError(f"finetune-q: width must be in 2..16, got {width}")
    if int(epochs) < 1:
        raise ValueError(f"finetune-q: epochs must be >= 1, got {epochs}")
    blocks = list(model)
    comp = dict(width=int(width), rounding=rounding, percentile=percentile, calibration=calibration,
                per_channel=per_channel, output_width=output_width)
    fq = FakeQuantModel(blocks, int(width), rounding, per_channel)
    # The activation formats are calibrated once and kept: the weights learn to live with them and
    # the export uses them (meta["finetune_q"]["formats"]); recalibrating after training would
    # move a format by a factor of 2 and undo what was learnt (measured: 84 % -> 74 % at 4 bits).
    im0 = compile_integer(model, calibration_x, **comp)
    formats = {r.name: r.out_fmt for r in im0.records}
    fq.set_formats(im0)
    dtype = blocks[0].params[next(iter(blocks[0].params))].dtype
    gen = np.random.default_rng(rng)
    if objective == "bll":
        from .methods import make
        opts = {**(bll_options or {}), "lr": lr}
        method = make("bll", fq.blocks, sample_input=fq.quantize_input(x[:8]), rng=rng, **opts)
        _load_bll_aux(method, aux or {})
    else:
        teacher = _copy_model(model)
        opts = [make_optimizer("adam", b, lr) for b in fq.blocks]
    history = []
    for e in range(int(epochs)):
        if objective == "bll":
            method.on_epoch_start(start_epoch + e)
        order = gen.permutation(len(x))
        total, n = 0.0, 0
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            xb, yb = x[idx], y[idx]
            xq = fq.quantize_input(xb).astype(dtype, copy=False)
            if objective == "bll":
                total += float(method.train_step(xq, yb))
            else:
                total += _reconstruct_step(fq.blocks, opts, teacher, xb, xq, yb)
            n += 1
        history.append({"epoch": e + 1, "train_loss": total / max(n, 1)})
        if log:
            log(f"finetune-q epoch {e + 1}/{epochs}: {objective} objective, output cross-entropy "
                f"{total / max(n, 1):.4f} (width {width})")
    return {"history": history, "aux": method.aux_state() if objective == "bll" else dict(aux or {}),
            "formats": formats}


def _reconstruct_step(blocks, opts, teacher, xb, xq, yb) -> float:
    """One step of every block: hidden blocks match the float teacher's block outputs from the
    fake-quantised input (each forward before any update, as in a BLL pipeline), the last block
    minimises cross-entropy.  Returns the last block's loss."""
    targets, t = [], xb
    for tb in list(teacher)[:-1]:
        t = tb.forward(t, train=False)
        targets.append(t)
    h, outs = xq, []
    for b in blocks:
        h = b.forward(h, train=True)
        outs.append(h)
    for k, (b, opt) in enumerate(zip(blocks, opts)):
        if k < len(blocks) - 1:
            d = outs[k] - targets[k]
            g = d / d.dtype.type(d.shape[0] * (d.size // d.shape[0]))  # L_k = ||h - t||^2 / (2 N D)
        else:
            loss, g = softmax_cross_entropy(outs[k], yb)
        b.backward(g.astype(outs[k].dtype, copy=False), need_dx=False)
        opt.step()
    return float(loss)


def bll_options(meta) -> dict:
    """The BLL keywords of the training run a checkpoint's ``meta`` records (its train options)."""
    import argparse

    from .cli import method_options
    opts = meta.get("options") or {}
    try:
        return method_options(argparse.Namespace(**opts))
    except AttributeError as err:
        raise ValueError(f"finetune-q: the checkpoint's training options are incomplete ({err}); "
                         "use --objective reconstruct") from None


def finetune_checkpoint(path, out, *, width, epochs=1, lr=3e-4, objective="auto", data="auto", n_calibration=256,
                        percentile=99.9, calibration="percentile", per_channel=False, output_width=None,
                        limit_train=None, batch_size=128, seed=0, log=print) -> dict:
    """``bll-ref finetune-q``: load a checkpoint, fine-tune it with :func:`finetune_q` on its
    training data (calibration batch = the first ``n_calibration`` training examples, as
    ``bll-ref export --calibration N`` takes them), write the fine-tuned checkpoint to ``out``
    with ``meta["finetune_q"]`` (the settings to export it with).  ``objective="auto"``: "bll"
    for a BLL checkpoint, "reconstruct" otherwise.  Returns a summary dict with the integer
    model's test accuracy before and after.  ``out`` may not be ``path`` (also through a symlink
    or hard link), nor a directory, device, FIFO or socket: ValueError / OSError before any work."""
    from . import checkpoint
    from .fileio import check_output
    check_output(out, [path])
    model, meta, aux = checkpoint.load(path)
    model, folded = fold_batchnorms(model)     # the checkpoint written holds the folded model
    if folded and log:
        log(f"finetune-q: folded {len(folded)} BatchNorm(s) into the layer before (eval-mode statistics): "
            + ", ".join(folded))
    if objective == "auto":
        objective = "bll" if meta.get("method") == "bll" else "reconstruct"
    images = meta.get("model") in ("cnn", "resnet", "resnet18")
    d, source = checkpoint.training_data(meta, data, images=images, limit_train=limit_train, log=log)
    if len(d["x_train"]) < n_calibration:
        raise ValueError(f"finetune-q: {n_calibration} calibration examples asked, the training set has "
                         f"{len(d['x_train'])}")
    cal = d["x_train"][:n_calibration]
    comp = dict(width=int(width), percentile=percentile, calibration=calibration, per_channel=per_channel,
                output_width=output_width)
    before = quantized_loss(compile_integer(model, cal, **comp), d["x_test"], d["y_test"])
    opts = bll_options(meta) if objective == "bll" else None
    res = finetune_q(model, d["x_train"], d["y_train"], cal, width=width, epochs=epochs, lr=lr,
                     batch_size=batch_size, objective=objective, bll_options=opts, aux=aux,
                     start_epoch=int((meta.get("options") or {}).get("epochs") or 0), percentile=percentile,
                     calibration=calibration, per_channel=per_channel, output_width=output_width, rng=seed,
                     log=log)
    after = quantized_loss(compile_integer(model, cal, out_formats=res["formats"], **comp), d["x_test"], d["y_test"])
    settings = {"width": int(width), "epochs": int(epochs), "lr": float(lr), "objective": objective,
                "percentile": float(percentile), "calibration": calibration, "per_channel": bool(per_channel),
                "output_width": int(output_width or width),
                "n_calibration": int(n_calibration), "data": source, "from": os.path.basename(os.fspath(path)),
                "folded_batchnorm": folded,
                "test_acc_before": before[1], "test_acc_after": after[1], "history": res["history"],
                "formats": {k: f.to_dict() for k, f in res["formats"].items()}}
    checkpoint.save(out, model, {**meta, "finetune_q": settings}, res["aux"])
    return settings
