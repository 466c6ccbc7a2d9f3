"""Block-local quantisation-aware fine-tuning: each block trained on its own, with fake-quantised
weights and activations (``bll_ref.fakequant``), so that the integer model made by
``bll-ref export --width W`` loses less.

The fake-quantised network is the float model with the integer model's rounding put back in
(``bll_ref.fakequant``; gradients by the clipped straight-through estimator).  Activation formats
are calibrated once on the calibration batch before fine-tuning and kept, and the export uses them
(``meta["finetune_q"]["formats"]``, ``compile_integer(..., out_formats=)``).

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

Step size: Adam with a cosine decay from ``lr`` to 0 over the fine-tuning (:func:`lr_at`).  With a
constant step the 4-bit integer model's test accuracy swung by up to 3 points from one step to the
next, so where fine-tuning stopped decided the result: on the 1-epoch BLL CNN three seeds ended at
84.8, 87.9 and 85.5 % (85.98 % before fine-tuning), with the cosine decay four seeds at 86.7-87.7 %
(docs/results.md, issue 24).  A classifier's narrow output can be trained for its argmax format
(``output_calibration="argmax"``, :func:`argmax_output_format`).

BatchNorm: a BatchNorm right after a Dense / Conv2d in the same block is folded into it first
(:func:`fold_batchnorms`, eval-mode running statistics, the exporter's own folding
``fixedpoint.walk.fold_batchnorm``), so fine-tuning trains, and the checkpoint holds, the layer the
integer model computes; the block outputs, and so the BLL heads and feedback, are unchanged.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import checkpoint
from . import layers as L
from .data import training_data
from .fakequant import FakeQuantModel, quantized_loss
from .fileio import check_output
from .fixedpoint import compile_integer
from .fixedpoint.calibrate import calibrate_argmax
from .fixedpoint.walk import Affine, walk
from .layers.base import layer_from_config, load_state_dict, state_dict
from .losses.output import softmax_cross_entropy
from .methods import make
from .optim import make_optimizer
from .training import TrainConfig

__all__ = ["finetune_q", "finetune_checkpoint", "fold_batchnorms", "bll_options", "lr_at", "argmax_output_format",
           "output_calibration_for", "OBJECTIVES", "SCHEDULES", "OUTPUT_CALIBRATIONS"]

OBJECTIVES = ("bll", "reconstruct")
SCHEDULES = ("cosine", "constant")
OUTPUT_CALIBRATIONS = ("range", "argmax")   # the model output's format: as every activation, or for argmax


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


def output_calibration_for(output_width, overflow="saturate") -> str:
    """The output calibration ``bll-ref export`` / ``finetune-q`` use when none is given: "argmax"
    for outputs narrower than 16 bits (every checkpoint ``bll-ref train`` writes is a classifier),
    "range" for 16-bit outputs (exact logits) and with wrapping overflow."""
    return "argmax" if int(output_width) < 16 and overflow == "saturate" else "range"


def argmax_output_format(model, calibration_x, width, *, rounding="nearest", overflow="saturate") -> dict:
    """``{name of the model's last integer record: calibrate_argmax(float outputs, width)}``, an
    ``out_formats`` entry for ``compile_integer`` / ``exporters.export``: the output format of a
    classifier read by argmax (``fixedpoint.calibrate.calibrate_argmax``)."""
    name = list(walk(model))[-1].name
    logits = np.asarray(model.forward(np.asarray(calibration_x), train=False), dtype=np.float64)
    return {name: calibrate_argmax(logits.reshape(len(logits), -1), width, rounding=rounding, overflow=overflow)}


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
               calibration="percentile", per_channel=False, output_width=None, output_calibration="range",
               schedule="cosine", rng=0, log=print):
    """Fine-tune ``model`` (Sequential of blocks, float weights updated in place) block by block
    with fake-quantised weights and activations.

    Parameters
    ----------
    model : Sequential
        Blocks of Dense / Conv2d, ReLU / LeakyReLU, MaxPool2d, Flatten; a BatchNorm must be
        folded first (:func:`fold_batchnorms`)
    x, y : training inputs (N, ...) float and labels (N,) int
    calibration_x : the batch that calibrates the activation formats, as ``bll-ref export`` will
        (its first ``--calibration`` training examples)
    width, rounding, percentile, calibration, per_channel, output_width : the export settings to
        train for (see :func:`~bll_ref.fixedpoint.compile_integer`)
    epochs, lr, batch_size : Adam steps over shuffled x
    output_calibration : "range" (the output format calibrated as every activation) or "argmax"
        (:func:`argmax_output_format`: for a classifier's narrow logits)
    schedule : "cosine" (default): the step size of every optimiser decays from ``lr`` to 0 over
        the fine-tuning, lr_t = lr (1 + cos(pi t / T)) / 2 for step t of T (Loshchilov & Hutter
        2017); "constant": ``lr`` throughout.  At 4 bits a constant step leaves the weights
        wherever the last few noisy steps put them: the integer model's test accuracy swung by
        up to 3 points from one step to the next on the BLL CNN (docs/results.md, issue 24)
    objective : "bll" (needs ``bll_options`` and the checkpoint ``aux``) or "reconstruct"
    bll_options : BLL keywords of the checkpoint's training run (``TrainConfig.method_options``)
    start_epoch : epochs the checkpoint was trained for (sets BLL's mixing m = 1 / (1 + tau epoch))

    Returns
    -------
    dict with history (per epoch: train loss), aux (updated BLL heads and feedback, or ``aux``
    unchanged), formats ({record name: QFormat}: the activation formats trained for, to give
    ``compile_integer(..., out_formats=)`` / ``bll-ref export``)
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"finetune-q: objective must be one of {OBJECTIVES}, got {objective!r}")
    if output_calibration not in OUTPUT_CALIBRATIONS:
        raise ValueError(f"finetune-q: output_calibration must be one of {OUTPUT_CALIBRATIONS}, "
                         f"got {output_calibration!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"finetune-q: schedule must be one of {SCHEDULES}, got {schedule!r}")
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
    if output_calibration == "argmax":
        comp["out_formats"] = argmax_output_format(model, calibration_x, int(output_width or width), rounding=rounding)
    im0 = compile_integer(model, calibration_x, **comp)
    formats = {r.name: r.out_fmt for r in im0.records}
    fq.set_formats(im0)
    dtype = blocks[0].params[next(iter(blocks[0].params))].dtype
    gen = np.random.default_rng(rng)
    if objective == "bll":
        opts = {**(bll_options or {}), "lr": lr}
        method = make("bll", fq.blocks, sample_input=fq.quantize_input(x[:8]), rng=rng, **opts)
        _load_bll_aux(method, aux or {})
    else:
        teacher = _copy_model(model)
        opts = [make_optimizer("adam", b, lr) for b in fq.blocks]
    optimizers = _optimizers(method) if objective == "bll" else opts
    steps_per_epoch = -(-len(x) // batch_size)
    history, t = [], 0
    for e in range(int(epochs)):
        if objective == "bll":
            method.on_epoch_start(start_epoch + e)
        order = gen.permutation(len(x))
        total, n = 0.0, 0
        for s in range(0, len(x), batch_size):
            for opt in optimizers:
                opt.lr = lr_at(lr, t, int(epochs) * steps_per_epoch, schedule)
            t += 1
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


def lr_at(lr, t, total, schedule="cosine") -> float:
    """Step size of step ``t`` (0-based) of ``total``: ``lr`` (constant) or lr (1 + cos(pi t / total)) / 2
    (cosine: ``lr`` at the first step, decaying towards 0 at the last)."""
    if schedule == "constant":
        return float(lr)
    return float(lr) * 0.5 * (1.0 + math.cos(math.pi * t / max(int(total), 1)))


def _optimizers(method) -> list:
    """The optimisers of a BLL method's learners: each block's, its head's and a trained linear
    feedback network's (twin feedback keeps its own step size)."""
    out = []
    for learner in method.learners:
        out.append(learner.opt)
        for part in (getattr(learner, "head_opt", None), getattr(getattr(learner, "feedback", None), "opt", None)):
            if part is not None:
                out.append(part)
    return out


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
    try:
        return TrainConfig.from_dict(meta.get("options") or {}, where="the checkpoint").method_options()
    except (ValueError, TypeError) as err:
        raise ValueError(f"finetune-q: the checkpoint's training options are unusable ({err}); "
                         "use --objective reconstruct") from None


def finetune_checkpoint(path, out, *, width, epochs=1, lr=3e-4, objective="auto", data="auto", n_calibration=256,
                        percentile=99.9, calibration="percentile", per_channel=False, output_width=None,
                        output_calibration=None, limit_train=None, batch_size=128, schedule="cosine", seed=0,
                        log=print) -> dict:
    """``bll-ref finetune-q``: load a checkpoint, fine-tune it with :func:`finetune_q` on its
    training data (calibration batch = the first ``n_calibration`` training examples, as
    ``bll-ref export --calibration N`` takes them), write the fine-tuned checkpoint to ``out``
    with ``meta["finetune_q"]`` (the settings to export it with).  ``objective="auto"``: "bll"
    for a BLL checkpoint, "reconstruct" otherwise; ``output_calibration`` None:
    :func:`output_calibration_for` the output width (as ``bll-ref export``).  Returns a summary dict with the integer
    model's test accuracy before and after.  ``out`` may not be ``path`` (also through a symlink
    or hard link), nor a directory, device, FIFO or socket: ValueError / OSError before any work."""
    check_output(out, [path])
    model, meta, aux = checkpoint.load(path)
    model, folded = fold_batchnorms(model)     # the checkpoint written holds the folded model
    if folded and log:
        log(f"finetune-q: folded {len(folded)} BatchNorm(s) into the layer before (eval-mode statistics): "
            + ", ".join(folded))
    if objective == "auto":
        objective = "bll" if meta.get("method") == "bll" else "reconstruct"
    images = meta.get("model") in ("cnn", "resnet", "resnet18")
    d, source = training_data(meta, data, images=images, limit_train=limit_train, log=log)
    if len(d["x_train"]) < n_calibration:
        raise ValueError(f"finetune-q: {n_calibration} calibration examples asked, the training set has "
                         f"{len(d['x_train'])}")
    cal = d["x_train"][:n_calibration]
    comp = dict(width=int(width), percentile=percentile, calibration=calibration, per_channel=per_channel,
                output_width=output_width)
    output_calibration = output_calibration or output_calibration_for(output_width or width)
    fmt0 = argmax_output_format(model, cal, int(output_width or width)) if output_calibration == "argmax" else None
    before = quantized_loss(compile_integer(model, cal, out_formats=fmt0, **comp), d["x_test"], d["y_test"])
    opts = bll_options(meta) if objective == "bll" else None
    res = finetune_q(model, d["x_train"], d["y_train"], cal, width=width, epochs=epochs, lr=lr,
                     batch_size=batch_size, objective=objective, bll_options=opts, aux=aux,
                     start_epoch=int((meta.get("options") or {}).get("epochs") or 0), percentile=percentile,
                     calibration=calibration, per_channel=per_channel, output_width=output_width,
                     output_calibration=output_calibration, schedule=schedule, rng=seed, log=log)
    after = quantized_loss(compile_integer(model, cal, out_formats=res["formats"], **comp), d["x_test"], d["y_test"])
    settings = {"width": int(width), "epochs": int(epochs), "lr": float(lr), "schedule": schedule,
                "objective": objective,
                "percentile": float(percentile), "calibration": calibration, "per_channel": bool(per_channel),
                "output_width": int(output_width or width), "output_calibration": output_calibration,
                "n_calibration": int(n_calibration), "data": source, "from": os.path.basename(os.fspath(path)),
                "folded_batchnorm": folded,
                "test_acc_before": before[1], "test_acc_after": after[1], "history": res["history"],
                "formats": {k: f.to_dict() for k, f in res["formats"].items()}}
    checkpoint.save(out, model, {**meta, "finetune_q": settings}, res["aux"])
    return settings
